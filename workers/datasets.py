"""Clip records and the audio-visual clip dataset.

:func:`load_records` reads a dataset root in any layout of :mod:`workers.layouts` and returns
:class:`ClipRecord` entries whose paths are confined to the root. :class:`AVClipDataset` decodes
each record with PyAV (:func:`workers.media.decode_clip`), computes the audio feature, and
optionally keeps both in a decode-once :class:`workers.cache.ClipCache`.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Sequence

import torch
from torch.utils.data import Dataset

from workers.cache import ClipCache, DecodeParams
from workers.features import audio_feature
from workers.layouts import (
    DERIVED_VAL_FRACTION,
    LAYOUTS,
    SPLITS,
    ManifestError,
    ManifestRow,
    read_layout,
)
from workers.media import BadMediaError, decode_clip, uniform_frame_indices

__all__ = [
    "AVClipDataset",
    "ClipRecord",
    "DecodeParams",
    "ManifestError",
    "BadMediaError",
    "load_records",
    "decode_record",
    "LAYOUTS",
    "SPLITS",
]

logger = logging.getLogger(__name__)


@dataclass
class ClipRecord:
    """One clip: its media files (absolute, inside the dataset root), label and split."""

    video_path: Path
    audio_path: Path
    label: int
    label_name: str
    split: str
    clip_id: str


def _confine(root: Path, relative: str, row: ManifestRow, what: str) -> Path:
    """``root / relative`` resolved, or :class:`ManifestError` if it leaves the root."""
    if not relative:
        raise ManifestError(row.manifest, row.line, f"empty {what} path")
    candidate = Path(relative)
    if ".." in candidate.parts:
        raise ManifestError(row.manifest, row.line, f"{what} path {relative!r} contains '..'")
    full = candidate if candidate.is_absolute() else root / candidate
    try:
        resolved = full.resolve()  # follows symlinks, so a link pointing outside is caught here
    except (RuntimeError, OSError) as err:  # a symlink loop (RuntimeError on Python 3.11, OSError from 3.13)
        raise ManifestError(row.manifest, row.line, f"{what} path {relative!r} cannot be resolved: {err}") from None
    if not resolved.is_relative_to(root):
        reason = "is a symlink that resolves" if resolved != full.absolute() else "is"
        raise ManifestError(
            row.manifest, row.line, f"{what} path {relative!r} {reason} outside the dataset root {root}"
        )
    return full


def load_records(
    root: str | os.PathLike[str],
    layout: str,
    split: str,
    *,
    class_names: Sequence[str] | None = None,
    val_fraction: float = DERIVED_VAL_FRACTION,
    skipped: list[tuple[str, str]] | None = None,
) -> tuple[list[ClipRecord], list[str]]:
    """Records of ``split`` in the dataset at ``root`` and its class names (index = label).

    Args:
        layout: one of ``avtune, cremad, vggsound, kinetics-sounds, ave``.
        split: ``train``, ``val`` or ``test``.
        class_names: fixes the label order (e.g. the train split's); by default the layout's own
            class list.
        val_fraction: share of each class of an official train list moved to ``val`` for layouts
            without a validation list (see :mod:`workers.layouts`).
        skipped: when given, bad rows are appended as ``("<manifest>, line N", problem)`` and
            left out instead of raising.

    Raises:
        ManifestError: a row whose path leaves the root (``..``, an absolute path or a symlink
            pointing outside) or whose label is not a known class; names the file and line.
    """
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    root = Path(root)
    if not root.is_dir():
        raise ValueError(f"dataset root {root} is not a folder")
    root = root.resolve()
    rows, layout_classes = read_layout(root, layout, split, val_fraction=val_fraction)
    names = list(class_names) if class_names is not None else layout_classes
    index_of = {name: i for i, name in enumerate(names)}
    records: list[ClipRecord] = []
    for row in rows:
        try:
            if row.problem is not None:
                raise ManifestError(row.manifest, row.line, row.problem)
            if row.label not in index_of:
                raise ManifestError(
                    row.manifest, row.line, f"unknown label {row.label!r} (known: {', '.join(names)})"
                )
            video = _confine(root, row.video, row, "video")
            audio = video if row.audio == row.video else _confine(root, row.audio, row, "audio")
        except ManifestError as err:
            if skipped is None:
                raise
            skipped.append((f"{err.path}, line {err.line}", err.problem))
            continue
        records.append(ClipRecord(video, audio, index_of[row.label], row.label, split, row.clip_id))
    return records, names


def decode_record(record: ClipRecord, params: DecodeParams) -> tuple[torch.Tensor, torch.Tensor]:
    """Decode one record: uint8 frames ``(T, H, W, 3)`` and float32 audio feature ``(1, T_a, F)``.

    ``T`` is ``params.decoded_frames``: the pool of ``pool_frames`` uniformly spaced frames when set."""
    frames, waveform = decode_clip(
        record.video_path,
        record.audio_path,
        num_frames=params.decoded_frames,
        frame_height=params.frame_height,
        frame_width=params.frame_width,
        sample_rate_hz=params.sample_rate_hz,
        clip_seconds=params.clip_seconds,
        max_source_pixels=params.max_source_pixels,
        max_source_seconds=params.max_source_seconds,
    )
    return frames, audio_feature(waveform, params)


class AVClipDataset(Dataset):
    """Audio-visual clips of one split.

    Item ``i``: ``(audio, visual, label, index)`` with
    ``audio`` float32 ``(1, T_a, F)`` (log-mel or OGM-GE spectrogram),
    ``visual`` float32 ``(3, T, H, W)`` scaled to [0, 1] then normalised per channel (``T`` =
    ``decode.num_frames``; with ``decode.pool_frames`` the clip's pool is decoded and cached once and the
    item takes ``num_frames`` uniformly spaced frames of it; :mod:`workers.augment` draws from the pool),
    ``label`` int64 scalar, ``index`` int64 scalar = ``i`` (position in this dataset, for
    methods that keep a per-sample memory bank).

    Args:
        root, layout, split: see :func:`load_records`.
        decode: decoding and feature parameters.
        cache_dir: folder of the decode-once cache; ``None`` decodes on every access.
        on_bad_media: ``"error"`` raises :class:`BadMediaError` / :class:`ManifestError` naming
            the file; ``"skip"`` checks every clip at construction (decoding it once, into the
            cache when there is one, so without a cache each clip is decoded twice) and drops the
            bad ones, listed in ``.skipped`` as ``(path, reason)``.
        class_names: fix the label order, e.g. to the train split's.
    """

    def __init__(
        self,
        root: str | os.PathLike[str],
        layout: str,
        split: str,
        decode: DecodeParams,
        cache_dir: str | os.PathLike[str] | None = None,
        on_bad_media: Literal["error", "skip"] = "error",
        class_names: Sequence[str] | None = None,
        *,
        val_fraction: float = DERIVED_VAL_FRACTION,
    ) -> None:
        if on_bad_media not in ("error", "skip"):
            raise ValueError(f"on_bad_media must be 'error' or 'skip', got {on_bad_media!r}")
        if not isinstance(decode, DecodeParams):
            raise TypeError(f"decode must be a DecodeParams, got {type(decode).__name__}")
        self.root = Path(root)
        self.layout = layout
        self.split = split
        self.decode = decode
        self.on_bad_media = on_bad_media
        self.cache = ClipCache(cache_dir, decode) if cache_dir is not None else None
        self.skipped: list[tuple[str, str]] = []
        records, names = load_records(
            self.root, layout, split, class_names=class_names, val_fraction=val_fraction,
            skipped=self.skipped if on_bad_media == "skip" else None,
        )
        self.class_names: list[str] = names
        if on_bad_media == "skip":
            kept = []
            for record in records:
                try:
                    self._tensors(record)
                except BadMediaError as err:
                    self.skipped.append((err.path, err.problem))
                    continue
                kept.append(record)
            records = kept
            if self.skipped:
                logger.warning(
                    "%s split of %s (%s layout): skipped %d bad clip(s); first: %s: %s",
                    split, self.root, layout, len(self.skipped), *self.skipped[0],
                )
        self.records: list[ClipRecord] = records
        self.labels = torch.tensor([r.label for r in records], dtype=torch.int64)
        # (x / 255 - mean) / std  ==  x * scale + shift, per channel
        mean = torch.tensor(decode.normalize_mean, dtype=torch.float64)
        std = torch.tensor(decode.normalize_std, dtype=torch.float64)
        self._scale = (1.0 / (255.0 * std)).to(torch.float32).view(3, 1, 1, 1)
        self._shift = (-mean / std).to(torch.float32).view(3, 1, 1, 1)
        # Evaluation frames of a pool: num_frames uniformly spaced among the decoded_frames (None: all of them).
        self.eval_frames: torch.Tensor | None = None
        if decode.decoded_frames != decode.num_frames:
            self.eval_frames = torch.tensor(uniform_frame_indices(decode.decoded_frames, decode.num_frames))

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def __len__(self) -> int:
        return len(self.records)

    def _tensors(self, record: ClipRecord) -> tuple[dict[str, torch.Tensor], bool]:
        if self.cache is None:
            frames, audio = decode_record(record, self.decode)
            return {"frames": frames, "audio": audio}, False
        return self.cache.get_or_build(
            record.video_path, record.audio_path, lambda: decode_record(record, self.decode)
        )

    def clip_tensors(self, index: int) -> dict[str, torch.Tensor]:
        """Clip ``index`` as decoded (and cached): uint8 ``frames`` ``(decode.decoded_frames, H, W, 3)`` (the
        whole pool) and the float32 ``audio`` feature. Read-only: they may be views of a cache entry."""
        return self._tensors(self.records[index])[0]

    def normalise(self, frames: torch.Tensor) -> torch.Tensor:
        """uint8 frames ``(T, H, W, 3)`` -> float32 ``(3, T, H, W)`` scaled to [0, 1], normalised per channel."""
        # In place after one contiguous copy (the straightforward form took 3x as long).
        visual = frames.permute(3, 0, 1, 2).to(torch.float32, memory_format=torch.contiguous_format)
        return visual.mul_(self._scale).add_(self._shift)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        tensors = self.clip_tensors(index)
        frames = tensors["frames"]
        if self.eval_frames is not None:
            frames = frames[self.eval_frames]
        return (
            tensors["audio"],
            self.normalise(frames),
            torch.tensor(self.records[index].label, dtype=torch.int64),
            torch.tensor(index, dtype=torch.int64),
        )

    def prefetch(self) -> int:
        """Decode every clip into the cache; returns how many were decoded (cache misses)."""
        if self.cache is None:
            raise ValueError("prefetch needs a cache: construct the dataset with cache_dir")
        misses = 0
        for record in self.records:
            _, hit = self._tensors(record)
            misses += not hit
        return misses
