"""Decode parameters and the decode-once clip cache.

A cache entry holds what one clip decodes to under one :class:`DecodeParams`: the uint8 frames
``(T, H, W, 3)`` (``T`` = ``DecodeParams.decoded_frames``: ``pool_frames`` when set, else ``num_frames``)
and the audio feature ``(1, T_a, F)``. Entries live at
``<cache_dir>/<params hash>/<file identity hash>.avc`` where the identity covers the resolved path,
size and ``st_mtime_ns`` of the video and audio files, so editing a file or changing a parameter
creates a new entry and never reuses a stale one.

Entry format (no pickle, so loading cannot run code): the 8-byte magic ``AVTCACH1``, a
little-endian uint32 header length, a JSON header (clip key, tensor names / dtypes / shapes /
offsets, payload length, CRC-32 of the payload) and the raw tensor bytes. Loading reads the file
once and wraps the bytes with ``torch.frombuffer``. ``torch.load`` was the first choice, but its
fixed cost (110-180 us for a 65 KB entry) alone exceeded the warm-cache budget.

Writes are atomic (a temporary file in the same folder, fsync, ``os.replace``), so any number of
DataLoader workers or processes can fill the same cache. An entry that is truncated, corrupt
(magic, header, length or CRC-32 mismatch) or does not match the parameters is deleted, logged
and rebuilt, never used.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import struct
import tempfile
import zlib
from pathlib import Path
from typing import Any, Callable, Literal

import torch

from workers.features import feature_shape
from workers.specs import DecodeParams

__all__ = [
    "DecodeParams",
    "cache_key",
    "ClipCache",
    "CacheEntryError",
    "audio_feature_shape",
    "encode_entry",
    "decode_entry",
    "CACHE_FORMAT_VERSION",
]

logger = logging.getLogger(__name__)

# Bump when the decode or feature code changes what an entry contains: old entries stop matching.
CACHE_FORMAT_VERSION = 2
ENTRY_SUFFIX = ".avc"
_MAGIC = b"AVTCACH1"
_HEADER_LENGTH = struct.Struct("<I")
_MAX_HEADER_BYTES = 1 << 16
_DTYPES = {"uint8": torch.uint8, "float32": torch.float32}
_ALIGN = 64  # payload and tensor offsets, so float32 views are aligned


def cache_key(params: DecodeParams) -> str:
    """16 hex digits identifying decode parameters (and the cache format)."""
    blob = json.dumps({"version": CACHE_FORMAT_VERSION, **params.model_dump(mode="json")}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def audio_feature_shape(params: DecodeParams) -> tuple[int, int, int]:
    """Shape ``(1, T, F)`` of the audio feature of one clip under ``params``."""
    return feature_shape(params)


class CacheEntryError(ValueError):
    """A cache entry that cannot be used (truncated, corrupt or for other parameters)."""


def encode_entry(key: str, tensors: dict[str, torch.Tensor]) -> bytes:
    """Serialise named CPU tensors (uint8 / float32) with the clip key into the entry format."""
    specs, chunks, offset = [], [], 0
    for name, tensor in tensors.items():
        dtype = str(tensor.dtype).removeprefix("torch.")
        if dtype not in _DTYPES:
            raise ValueError(f"cache entries hold uint8 / float32 tensors, {name} is {dtype}")
        data = tensor.detach().cpu().contiguous().numpy().tobytes()
        padding = -offset % _ALIGN  # every tensor starts on an aligned offset
        chunks.append(b"\0" * padding)
        offset += padding
        specs.append({"name": name, "dtype": dtype, "shape": list(tensor.shape), "offset": offset, "nbytes": len(data)})
        chunks.append(data)
        offset += len(data)
    payload = b"".join(chunks)
    header = json.dumps(
        {"key": key, "tensors": specs, "payload_bytes": len(payload), "crc32": zlib.crc32(payload)},
        separators=(",", ":"),
    ).encode()
    prefix = len(_MAGIC) + _HEADER_LENGTH.size
    header += b" " * (-(prefix + len(header)) % _ALIGN)  # JSON allows trailing blanks
    return _MAGIC + _HEADER_LENGTH.pack(len(header)) + header + payload


def decode_entry(buffer: bytearray) -> tuple[str, dict[str, torch.Tensor]]:
    """Parse an entry; raises :class:`CacheEntryError` saying what is wrong with it."""
    prefix = len(_MAGIC) + _HEADER_LENGTH.size
    if len(buffer) < prefix or bytes(buffer[: len(_MAGIC)]) != _MAGIC:
        raise CacheEntryError("not a cache entry (bad magic)")
    (header_bytes,) = _HEADER_LENGTH.unpack_from(buffer, len(_MAGIC))
    if header_bytes > _MAX_HEADER_BYTES or prefix + header_bytes > len(buffer):
        raise CacheEntryError("truncated or corrupt header")
    try:
        header = json.loads(bytes(buffer[prefix : prefix + header_bytes]))
        start = prefix + header_bytes
        payload_bytes = int(header["payload_bytes"])
        if len(buffer) != start + payload_bytes:
            raise CacheEntryError(f"truncated: {len(buffer) - start} of {payload_bytes} payload bytes")
        if zlib.crc32(memoryview(buffer)[start:]) != header["crc32"]:
            raise CacheEntryError("payload checksum mismatch")
        tensors = {}
        for spec in header["tensors"]:
            dtype = _DTYPES[spec["dtype"]]
            count = spec["nbytes"] // dtype.itemsize
            if count:
                flat = torch.frombuffer(buffer, dtype=dtype, count=count, offset=start + spec["offset"])
            else:
                flat = torch.empty(0, dtype=dtype)
            tensors[spec["name"]] = flat.view(spec["shape"])
        return str(header["key"]), tensors
    except CacheEntryError:
        raise
    except (ValueError, KeyError, TypeError, RuntimeError) as err:
        raise CacheEntryError(f"corrupt header ({type(err).__name__}: {err})") from None


class ClipCache:
    """Decoded clip tensors on disk, keyed by file identity and :class:`DecodeParams`."""

    def __init__(self, cache_dir: str | os.PathLike[str], params: DecodeParams) -> None:
        self.params = params
        self.directory = Path(cache_dir) / cache_key(params)
        self._frames_shape = (params.decoded_frames, params.frame_height, params.frame_width, 3)
        self._audio_shape = audio_feature_shape(params)
        # Resolved paths, memoised per instance: resolving walks every path component.
        self._resolved: dict[str, str] = {}
        self.write_failed = False  # set after the first failed write: stop trying

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_resolved": {}}

    def _identity(self, path: Path) -> str:
        text = os.fspath(path)
        resolved = self._resolved.get(text)
        if resolved is None:
            resolved = self._resolved[text] = os.path.realpath(text)
        st = os.stat(resolved)
        return f"{resolved}\0{st.st_size}\0{st.st_mtime_ns}"

    def key(self, video_path: Path, audio_path: Path) -> str:
        """Identity of a clip's files; raises ``OSError`` when a file cannot be stat'ed."""
        identity = f"{self._identity(video_path)}\n{self._identity(audio_path)}"
        return hashlib.sha256(identity.encode()).hexdigest()

    def entry_path(self, key: str) -> Path:
        return self.directory / f"{key}{ENTRY_SUFFIX}"

    def _mismatch(self, key: str, stored_key: str, tensors: dict[str, torch.Tensor]) -> str | None:
        """``None`` when the tensors are a complete entry for ``key``; else what is wrong."""
        if stored_key != key:
            return "entry belongs to another clip"
        if set(tensors) != {"frames", "audio"}:
            return f"unexpected tensors {sorted(tensors)}"
        frames, audio = tensors["frames"], tensors["audio"]
        if frames.dtype != torch.uint8 or tuple(frames.shape) != self._frames_shape:
            return f"frames are not uint8 {self._frames_shape}"
        if audio.dtype != torch.float32 or tuple(audio.shape) != self._audio_shape:
            return f"audio is not float32 {self._audio_shape}"
        return None

    def load(self, key: str) -> dict[str, torch.Tensor] | None:
        """The cached tensors for ``key``, or ``None`` (a bad entry is deleted first)."""
        path = self.entry_path(key)
        try:
            with open(path, "rb") as handle:
                buffer = bytearray(os.fstat(handle.fileno()).st_size)
                read = handle.readinto(buffer)
        except (FileNotFoundError, NotADirectoryError):  # no entry (or no cache folder at all)
            return None
        except OSError as err:
            self._discard(path, f"unreadable ({err})")
            return None
        try:
            if read != len(buffer):
                raise CacheEntryError("short read")
            stored_key, tensors = decode_entry(buffer)
        except CacheEntryError as err:
            self._discard(path, str(err))
            return None
        problem = self._mismatch(key, stored_key, tensors)
        if problem is not None:
            self._discard(path, problem)
            return None
        return tensors

    def _discard(self, path: Path, problem: str) -> None:
        logger.warning("cache entry %s is unusable (%s); deleting and rebuilding it", path, problem)
        path.unlink(missing_ok=True)

    def store(self, key: str, frames: torch.Tensor, audio: torch.Tensor) -> Path:
        """Write an entry atomically; returns its path."""
        tensors = {"frames": frames, "audio": audio}
        problem = self._mismatch(key, key, tensors)
        if problem is None and not bool(torch.isfinite(audio).all()):
            problem = "audio has non-finite values"
        if problem is not None:
            raise ValueError(f"refusing to cache clip {key[:12]}: {problem}")
        self.directory.mkdir(parents=True, exist_ok=True)
        params_file = self.directory / "params.json"
        if not params_file.exists():
            _atomic_write(params_file, self.params.model_dump_json(indent=2).encode())
        path = self.entry_path(key)
        _atomic_write(path, encode_entry(key, tensors))
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
        if not self.write_failed:
            try:
                self.store(key, frames, audio)
            except OSError as err:
                # Disk full, a read-only dataset folder: the cache is an optimisation, training goes on
                # without it. Said once per process, not once per clip.
                self.write_failed = True
                logger.warning("decode cache %s cannot be written (%s); going on without storing decoded clips",
                               self.directory, err)
        return {"frames": frames, "audio": audio}, False


def _atomic_write(path: Path, data: bytes) -> None:
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(handle, "wb") as out:
            out.write(data)
            out.flush()
            os.fsync(out.fileno())
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
