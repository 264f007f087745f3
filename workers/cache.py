"""Decode parameters and the decode-once clip cache.

A cache entry holds what one clip decodes to under one :class:`DecodeParams`: the uint8 frames
``(T, H, W, 3)`` and the audio feature ``(1, T_a, F)``. Entries live at
``<cache_dir>/<params hash>/<file identity hash>.pt`` where the identity covers the resolved path,
size and ``st_mtime_ns`` of the video and audio files, so editing a file or changing a parameter
creates a new entry and never reuses a stale one.

Writes are atomic (a temporary file in the same folder, fsync, ``os.replace``), so any number of
DataLoader workers or processes can fill the same cache. Loading uses
``torch.load(weights_only=True)``; an entry that fails to load or whose content does not match the
parameters (half-written by a killed process, corrupt, wrong shape) is deleted and rebuilt.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from pathlib import Path
from typing import Any, Callable, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator

from workers.features import log_mel_num_frames, ms_to_samples, stft_num_frames
from workers.media import clip_num_samples

__all__ = ["DecodeParams", "ClipCache", "audio_feature_shape", "CACHE_FORMAT_VERSION"]

logger = logging.getLogger(__name__)

# Bump when the decode or feature code changes what an entry contains: old entries stop matching.
CACHE_FORMAT_VERSION = 1


class DecodeParams(BaseModel):
    """How clips are decoded and featurised (part of the experiment spec and of the cache key).

    ``audio_feature="logmel"``: :func:`workers.features.log_mel` with ``n_mels`` bins, ``win_ms``
    windows and ``hop_ms`` hop. ``"spectrogram"``: :func:`workers.features.spectrogram_ogm` with
    ``n_fft = round(win_ms * sr / 1000)`` and ``hop = round(hop_ms * sr / 1000)``; OGM-GE's CREMA-D
    setting (n_fft 512, hop 353 at 22050 Hz) is ``sample_rate_hz=22050, win_ms=23.22,
    hop_ms=16.01``, its VGGSound one (256 / 128 at 16 kHz) is ``win_ms=16, hop_ms=8``.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    num_frames: int = Field(4, gt=0, description="video frames sampled uniformly per clip")
    frame_height: int = Field(64, gt=0)
    frame_width: int = Field(64, gt=0)
    sample_rate_hz: int = Field(16000, gt=0)
    clip_seconds: float = Field(1.0, gt=0)
    audio_feature: Literal["logmel", "spectrogram"] = "logmel"
    n_mels: int = Field(40, gt=0)
    win_ms: float = Field(25.0, gt=0)
    hop_ms: float = Field(10.0, gt=0)
    normalize_mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    normalize_std: tuple[float, float, float] = (0.229, 0.224, 0.225)

    @field_validator("normalize_std")
    @classmethod
    def _positive_std(cls, value: tuple[float, float, float]) -> tuple[float, float, float]:
        if any(v <= 0 for v in value):
            raise ValueError(f"every channel's std must be positive, got {value}")
        return value

    def cache_key(self) -> str:
        """16 hex digits identifying these parameters (and the cache format)."""
        blob = json.dumps({"version": CACHE_FORMAT_VERSION, **self.model_dump(mode="json")}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


def audio_feature_shape(params: DecodeParams) -> tuple[int, int, int]:
    """Shape ``(1, T, F)`` of the audio feature of one clip under ``params``."""
    num_samples = clip_num_samples(params.clip_seconds, params.sample_rate_hz)
    hop = ms_to_samples(params.hop_ms, params.sample_rate_hz)
    window = ms_to_samples(params.win_ms, params.sample_rate_hz)
    if params.audio_feature == "logmel":
        return (1, log_mel_num_frames(num_samples, hop), params.n_mels)
    return (1, stft_num_frames(num_samples, hop), window // 2 + 1)


def _file_identity(path: Path) -> dict[str, Any]:
    resolved = path.resolve()
    st = resolved.stat()
    return {"path": str(resolved), "size": st.st_size, "mtime_ns": st.st_mtime_ns}


class ClipCache:
    """Decoded clip tensors on disk, keyed by file identity and :class:`DecodeParams`."""

    def __init__(self, cache_dir: str | os.PathLike[str], params: DecodeParams) -> None:
        self.params = params
        self.directory = Path(cache_dir) / params.cache_key()
        self._frames_shape = (params.num_frames, params.frame_height, params.frame_width, 3)
        self._audio_shape = audio_feature_shape(params)

    def key(self, video_path: Path, audio_path: Path) -> str:
        """Identity of a clip's files; raises ``OSError`` when a file cannot be stat'ed."""
        identity = {"video": _file_identity(video_path), "audio": _file_identity(audio_path)}
        return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()

    def entry_path(self, key: str) -> Path:
        return self.directory / f"{key}.pt"

    def _valid(self, entry: Any, key: str) -> str | None:
        """``None`` when ``entry`` is a complete entry for ``key``; else what is wrong."""
        if not isinstance(entry, dict) or set(entry) != {"key", "frames", "audio"}:
            return "unexpected content"
        if entry["key"] != key:
            return "entry belongs to another clip"
        frames, audio = entry["frames"], entry["audio"]
        if not isinstance(frames, torch.Tensor) or frames.dtype != torch.uint8 or tuple(frames.shape) != self._frames_shape:
            return f"frames are not uint8 {self._frames_shape}"
        if not isinstance(audio, torch.Tensor) or audio.dtype != torch.float32 or tuple(audio.shape) != self._audio_shape:
            return f"audio is not float32 {self._audio_shape}"
        if not bool(torch.isfinite(audio).all()):
            return "audio has non-finite values"
        return None

    def load(self, key: str) -> dict[str, torch.Tensor] | None:
        """The cached tensors for ``key``, or ``None`` (a bad entry is deleted first)."""
        path = self.entry_path(key)
        try:
            entry = torch.load(path, map_location="cpu", weights_only=True)
        except FileNotFoundError:
            return None
        except Exception as err:  # truncated / garbage file: unpickling fails in many ways
            self._discard(path, f"unreadable ({type(err).__name__}: {err})")
            return None
        problem = self._valid(entry, key)
        if problem is not None:
            self._discard(path, problem)
            return None
        return {"frames": entry["frames"], "audio": entry["audio"]}

    def _discard(self, path: Path, problem: str) -> None:
        logger.warning("cache entry %s is %s; deleting and rebuilding it", path, problem)
        path.unlink(missing_ok=True)

    def store(self, key: str, frames: torch.Tensor, audio: torch.Tensor) -> Path:
        """Write an entry atomically; returns its path."""
        entry = {"key": key, "frames": frames.contiguous(), "audio": audio.contiguous()}
        problem = self._valid(entry, key)
        if problem is not None:
            raise ValueError(f"refusing to cache clip {key[:12]}: {problem}")
        self.directory.mkdir(parents=True, exist_ok=True)
        params_file = self.directory / "params.json"
        if not params_file.exists():
            _atomic_write(params_file, lambda f: f.write(self.params.model_dump_json(indent=2).encode()))
        path = self.entry_path(key)
        _atomic_write(path, lambda f: torch.save(entry, f))
        return path

    def get_or_build(
        self,
        video_path: Path,
        audio_path: Path,
        build: Callable[[], tuple[torch.Tensor, torch.Tensor]],
    ) -> tuple[dict[str, torch.Tensor], bool]:
        """Cached tensors for the clip, building and storing them on a miss.

        ``build`` returns ``(frames, audio)``. Returns ``(tensors, hit)``. When a file cannot be
        stat'ed the cache is bypassed so ``build`` raises its own error naming the file.
        """
        try:
            key = self.key(video_path, audio_path)
        except OSError:
            frames, audio = build()
            return {"frames": frames, "audio": audio}, False
        cached = self.load(key)
        if cached is not None:
            return cached, True
        frames, audio = build()
        self.store(key, frames, audio)
        return {"frames": frames, "audio": audio}, False


def _atomic_write(path: Path, write: Callable[[Any], Any]) -> None:
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(handle, "wb") as out:
            write(out)
            out.flush()
            os.fsync(out.fileno())
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
