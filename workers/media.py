"""Media probing and clip decoding with PyAV.

A clip is the window ``[start, start + clip_seconds)`` of a file, where ``start`` is the first
timestamp of the stream (FLV files written with B-frames start at e.g. 0.2 s; MP4 edit lists make
it 0). Video frames are sampled uniformly over the frames inside that window; audio is resampled
with ``av.AudioResampler``, averaged to mono float32 and zero-padded or cropped to the window.

Audio and video may come from one file (``.mp4`` with both streams) or from two files (CREMA-D ships
``AudioWAV/*.wav`` and ``VideoFlash/*.flv`` separately).

Every failure is raised as :class:`BadMediaError` naming the file and the problem, never as a raw
FFmpeg / OS error, so a dataset can report or skip it.
"""

from __future__ import annotations

import os
import stat
import threading
from fractions import Fraction
from pathlib import Path
from typing import Any

import av
import av.error
from av.video.reformatter import VideoReformatter
import numpy as np
import torch

__all__ = [
    "BadMediaError",
    "probe_media",
    "decode_clip",
    "uniform_frame_indices",
    "clip_num_samples",
    "DEFAULT_MAX_SOURCE_PIXELS",
    "DEFAULT_MAX_SOURCE_SECONDS",
]

# A file whose container is recognised but which cannot be decoded is reported as truncated or
# corrupt; anything else as "not a media file". The signatures are the containers' magic numbers.
_CONTAINER_SIGNATURES: tuple[tuple[str, int, bytes], ...] = (
    ("MP4/MOV", 4, b"ftyp"),
    ("MP4/MOV", 4, b"moov"),
    ("MP4/MOV", 4, b"mdat"),
    ("MP4/MOV", 4, b"free"),
    ("MP4/MOV", 4, b"wide"),
    ("FLV", 0, b"FLV"),
    ("WAV", 0, b"RIFF"),
    ("Matroska/WebM", 0, b"\x1a\x45\xdf\xa3"),
    ("Ogg", 0, b"OggS"),
    ("MP3", 0, b"ID3"),
)

# Decoded video must cover at least this share of the duration the container declares (capped at
# the clip window); less means the file was cut short after its header was written.
_MIN_DECLARED_COVERAGE = 0.5

# Limits on the source media, checked from the container's header before anything is decoded (the
# defaults of ``DecodeParams.max_source_pixels`` / ``max_source_seconds``): a frame of at most 4K
# (3840 x 2160) and a file of at most 10 minutes admit every clip of the public datasets.
DEFAULT_MAX_SOURCE_PIXELS = 3840 * 2160
DEFAULT_MAX_SOURCE_SECONDS = 600.0


class BadMediaError(ValueError):
    """A media file that cannot be used: names the file and the problem.

    ``str(err) == f"{path}: {problem}"``.
    """

    def __init__(self, path: str | os.PathLike[str], problem: str) -> None:
        self.path = str(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}")

    def __reduce__(self) -> tuple[Any, ...]:  # picklable across DataLoader worker processes
        return (type(self), (self.path, self.problem))


def _container_kind(header: bytes) -> str | None:
    for kind, offset, magic in _CONTAINER_SIGNATURES:
        if header[offset : offset + len(magic)] == magic:
            return kind
    return None


def _check_file(path: Path) -> bytes:
    """Check that ``path`` is a readable, non-empty, complete file; return its first 16 bytes.

    "Complete" is checked where the container declares its own size: the RIFF header of a WAV and
    the top-level box sizes of an MP4/MOV. One unbuffered descriptor serves the header read and
    that check (positioned reads of 16 bytes, no Python file object).
    """
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise BadMediaError(path, "file not found") from None
    except PermissionError:
        raise BadMediaError(path, "permission denied") from None
    except OSError as err:
        raise BadMediaError(path, f"cannot stat file ({err.strerror or err})") from None
    if not stat.S_ISREG(st.st_mode):
        raise BadMediaError(path, "not a regular file")
    if st.st_size == 0:
        raise BadMediaError(path, "file is empty (0 bytes)")
    try:
        fd = os.open(path, _OPEN_FLAGS)
        try:
            header = _read_at(fd, 0, 16)
            problem = _truncation_problem(fd, _container_kind(header), header, st.st_size)
        finally:
            os.close(fd)
    except PermissionError:
        raise BadMediaError(path, "permission denied") from None
    except OSError as err:
        raise BadMediaError(path, f"cannot read file ({err.strerror or err})") from None
    if problem is not None:
        raise BadMediaError(path, problem)
    return header


_OPEN_FLAGS = os.O_RDONLY | getattr(os, "O_BINARY", 0)


def _read_at(fd: int, offset: int, size: int) -> bytes:
    """Up to ``size`` bytes at ``offset`` (fewer only at the end of the file)."""
    if hasattr(os, "pread"):
        data = os.pread(fd, size, offset)
        while len(data) < size:  # a short read before the end of the file: read on
            more = os.pread(fd, size - len(data), offset + len(data))
            if not more:
                break
            data += more
        return data
    os.lseek(fd, offset, os.SEEK_SET)  # pragma: no cover - platforms without pread (Windows)
    data = b""
    while len(data) < size:
        more = os.read(fd, size - len(data))
        if not more:
            break
        data += more
    return data


# Fragmented MP4s can have many top-level boxes; past this many the walk stops checking.
_MAX_MP4_BOXES = 100_000


def _truncation_problem(fd: int, kind: str | None, header: bytes, size: int) -> str | None:
    """Detect a file cut short from the sizes its container declares (MP4 boxes, RIFF header)."""
    if kind == "WAV" and header[8:12] == b"WAVE":
        riff_size = int.from_bytes(header[4:8], "little")
        declared = riff_size + 8
        # Writers that stream to a pipe leave the size at 0 or 0xFFFFFFFF: nothing to check.
        if riff_size not in (0, 0xFFFFFFFF) and declared > size:
            return f"truncated WAV file (header declares {declared} bytes, file has {size})"
        return None
    if kind != "MP4/MOV":
        return None
    # ISO/IEC 14496-12 section 4.2: a box is a 32-bit big-endian size (1: a 64-bit size follows;
    # 0: the box runs to the end of the file) and a 4-character type.
    offset = 0
    head = header
    for _ in range(_MAX_MP4_BOXES):
        if offset >= size:
            return None
        if offset:
            head = _read_at(fd, offset, 16)
        if len(head) < 8:
            return f"truncated MP4 file ({size - offset} stray bytes after the last box)"
        box_size = int.from_bytes(head[:4], "big")
        box_type = head[4:8].decode("latin-1")
        if box_size == 1:
            if len(head) < 16:
                return f"truncated MP4 file (box '{box_type}' at byte {offset} is cut)"
            box_size = int.from_bytes(head[8:16], "big")
        elif box_size == 0:
            return None
        if box_size < 8:
            return f"corrupt MP4 file (box '{box_type}' at byte {offset} has size {box_size})"
        if offset + box_size > size:
            return (
                f"truncated MP4 file (box '{box_type}' at byte {offset} declares {box_size} bytes, "
                f"only {size - offset} remain)"
            )
        offset += box_size
    return None


def _ffmpeg_message(err: BaseException) -> str:
    return str(getattr(err, "strerror", None) or err).strip()


def _demuxer_for(kind: str | None, header: bytes) -> str | None:
    """The FFmpeg demuxer probing picks for a file whose signature is unambiguous, else ``None``."""
    if kind == "MP4/MOV":
        return "mov"  # ISO base media boxes: FFmpeg's "mov,mp4,m4a,3gp,3g2,mj2" demuxer
    if kind == "WAV" and header[8:12] == b"WAVE":
        return "wav"
    return None


def _open(path: Path, *, known_format: bool = False) -> av.container.InputContainer:
    """Check ``path`` and open it for reading.

    ``known_format``: open MP4/MOV and WAV files with the demuxer their signature names instead of
    letting FFmpeg probe every demuxer for the format (the header read by :func:`_check_file`
    already identifies it). A file the named demuxer rejects is opened again with probing, so
    errors are reported as before. The container's ``format.name`` is then the short name
    ("mov"), so :func:`probe_media` does not use this.
    """
    header = _check_file(path)
    if known_format:
        demuxer = _demuxer_for(_container_kind(header), header)
        if demuxer is not None:
            try:
                return av.open(str(path), mode="r", format=demuxer)
            except Exception:  # noqa: BLE001 - probe and report below
                pass
    try:
        return av.open(str(path), mode="r")
    except PermissionError:
        raise BadMediaError(path, "permission denied") from None
    except (av.error.FFmpegError, OSError, ValueError, UnicodeDecodeError) as err:
        kind = _container_kind(header)
        if kind is not None:
            raise BadMediaError(
                path, f"truncated or corrupt {kind} file ({_ffmpeg_message(err)})"
            ) from None
        raise BadMediaError(path, f"not a media file ({_ffmpeg_message(err)})") from None


def _seconds(value: int | None, time_base: Fraction | None) -> float | None:
    if value is None or time_base is None:
        return None
    return float(value * time_base)


def probe_media(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Describe a media file's container and streams without decoding it.

    Returns ``{"path", "format", "size_bytes", "duration_s", "streams": [...], "video", "audio"}``
    where each stream dict has ``index, type, codec, duration_s`` plus ``width, height, fps,
    frames`` (video) or ``sample_rate_hz, channels`` (audio); ``video`` / ``audio`` is the first
    stream of that type or ``None``. Raises :class:`BadMediaError`.
    """
    path = Path(path)
    container = _open(path)
    try:
        streams: list[dict[str, Any]] = []
        for stream in container.streams:
            info: dict[str, Any] = {
                "index": stream.index,
                "type": stream.type,
                "codec": stream.codec_context.name if stream.codec_context else None,
                "duration_s": _seconds(stream.duration, stream.time_base),
            }
            if stream.type == "video":
                rate = stream.average_rate or stream.guessed_rate
                info.update(
                    width=stream.codec_context.width,
                    height=stream.codec_context.height,
                    fps=float(rate) if rate else None,
                    frames=int(stream.frames) or None,
                )
            elif stream.type == "audio":
                info.update(
                    sample_rate_hz=stream.codec_context.sample_rate,
                    channels=stream.codec_context.channels,
                )
            streams.append(info)
        duration = container.duration / av.time_base if container.duration is not None else None
        return {
            "path": str(path),
            "format": container.format.name,
            "size_bytes": path.stat().st_size,
            "duration_s": duration,
            "streams": streams,
            "video": next((s for s in streams if s["type"] == "video"), None),
            "audio": next((s for s in streams if s["type"] == "audio"), None),
        }
    finally:
        container.close()


def uniform_frame_indices(num_available: int, num_frames: int) -> list[int]:
    """Indices of ``num_frames`` frames spread uniformly over ``num_available`` frames.

    Frame ``k`` is the centre of the ``k``-th of ``num_frames`` equal segments,
    ``floor((2k + 1) * num_available / (2 * num_frames))`` (segment-based sampling as in TSN);
    indices repeat when fewer frames are available than requested.
    """
    if num_available <= 0 or num_frames <= 0:
        raise ValueError(f"need positive counts, got {num_available=} {num_frames=}")
    return [((2 * k + 1) * num_available) // (2 * num_frames) for k in range(num_frames)]


class _AudioCollector:
    """Resamples decoded audio frames to mono float32 at ``rate`` until ``target`` samples.

    Channels are resampled separately and then averaged, the mono mix librosa's
    ``load(mono=True)`` gives (used by the OGM-GE loaders); FFmpeg's own stereo-to-mono matrix
    would scale each channel by 1/sqrt(2) instead.

    Samples go straight into the zero-initialised output (the zero padding of a short clip), read
    from the resampled frames' planes without intermediate arrays.
    """

    def __init__(self, rate: int, target: int) -> None:
        self.resampler = av.AudioResampler(format="fltp", layout=None, rate=rate)
        self.target = target
        self.samples = np.zeros(target, dtype=np.float32)
        self.count = 0

    @property
    def done(self) -> bool:
        return self.count >= self.target

    def add(self, frame: av.AudioFrame | None) -> None:
        for out in self.resampler.resample(frame):
            # The resampler's output is planar float32 ("fltp"), one plane per channel: the
            # arrays AudioFrame.to_ndarray() would stack, read in place.
            n = out.samples
            planes = out.planes
            if len(planes) == 1:
                chunk = np.frombuffer(planes[0], dtype=np.float32, count=n)
            else:
                chunk = np.vstack(
                    [np.frombuffer(plane, dtype=np.float32, count=n) for plane in planes]
                ).mean(axis=0, dtype=np.float32)
            room = self.target - self.count
            if room > 0:
                if n <= room:
                    self.samples[self.count : self.count + n] = chunk
                else:
                    self.samples[self.count :] = chunk[:room]
            self.count += n

    def waveform(self) -> torch.Tensor:
        return torch.from_numpy(self.samples)  # zero-padded at the end when the clip is short


def _single_threaded(stream: av.stream.Stream) -> None:
    """Decode on the calling thread.

    Clips are short and a loader runs one decode per DataLoader worker, so parallelism comes from
    the workers; a per-file decoder thread pool only adds thread start-up per clip and fights
    torch's OpenMP threads for the cores.
    """
    stream.codec_context.thread_type = "NONE"
    stream.codec_context.thread_count = 1


def _stream_start(stream: av.stream.Stream) -> float:
    start = _seconds(stream.start_time, stream.time_base)
    return start if start is not None else 0.0


def _time_scale(stream: av.stream.Stream) -> float:
    """Seconds per timestamp tick as a float (Fraction arithmetic per packet is slow)."""
    return float(stream.time_base) if stream.time_base is not None else 0.0


def _declared_seconds(container: av.container.InputContainer, stream: av.stream.Stream) -> float | None:
    """The duration the file declares: the container's, else the stream's (``None``: unknown)."""
    if container.duration is not None and container.duration > 0:
        return container.duration / av.time_base
    return _seconds(stream.duration, stream.time_base)


def _check_source_limits(
    path: Path,
    container: av.container.InputContainer,
    stream: av.stream.Stream,
    max_pixels: int | None,
    max_seconds: float,
) -> None:
    """Refuse a file whose frames (video ``stream``) or declared duration exceed the limits.

    Reads only what opening the file parsed (stream parameters, container header); decodes
    nothing. ``max_pixels=None``: no frame-size check (``stream`` is an audio stream). A size or
    duration the file does not declare is not checked (decoding stays bounded by the clip window).
    """
    if max_pixels is not None:
        width, height = stream.codec_context.width, stream.codec_context.height
        if width and height and width * height > max_pixels:
            raise BadMediaError(
                path,
                f"source frames {width}x{height} ({width * height} pixels) exceed "
                f"max_source_pixels {max_pixels}",
            )
    duration = _declared_seconds(container, stream)
    if duration is not None and duration > max_seconds:
        raise BadMediaError(
            path, f"duration {duration:.3f} s exceeds max_source_seconds {max_seconds:g}"
        )


def _decode_audio_only(path: Path, collector: _AudioCollector, max_seconds: float) -> None:
    container = _open(path, known_format=True)
    try:
        if not container.streams.audio:
            raise BadMediaError(path, "no audio stream")
        stream = container.streams.audio[0]
        _check_source_limits(path, container, stream, None, max_seconds)
        for packet in container.demux(stream):
            for frame in packet.decode():
                collector.add(frame)
            if collector.done:
                break
        collector.add(None)  # flush the resampler's buffered tail
    except av.error.FFmpegError as err:
        raise BadMediaError(path, f"truncated or corrupt audio stream ({_ffmpeg_message(err)})") from None
    finally:
        container.close()
    if collector.count == 0:
        raise BadMediaError(path, "audio stream has no decodable samples")


_reformatters = threading.local()


def _new_reformatter() -> VideoReformatter:
    """This thread's reformatter: its swscale context is reused across frames and clips (swscale
    rebuilds it when the source or target format changes)."""
    reformatter = getattr(_reformatters, "reformatter", None)
    if reformatter is None:
        reformatter = _reformatters.reformatter = VideoReformatter()
    return reformatter


def _frame_to_rgb(
    reformatter: VideoReformatter, frame: av.VideoFrame, height: int, width: int
) -> np.ndarray:
    # threads=1 stops swscale from starting a thread pool per context (its default, "auto",
    # costs far more than scaling a few small frames, and more still in a process that has
    # loaded torch).
    return reformatter.reformat(
        frame, width=width, height=height, format="rgb24", interpolation="BILINEAR", threads=1
    ).to_ndarray()


def decode_clip(
    video_path: str | os.PathLike[str],
    audio_path: str | os.PathLike[str],
    *,
    num_frames: int,
    frame_height: int,
    frame_width: int,
    sample_rate_hz: int,
    clip_seconds: float,
    max_source_pixels: int = DEFAULT_MAX_SOURCE_PIXELS,
    max_source_seconds: float = DEFAULT_MAX_SOURCE_SECONDS,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Decode one clip: ``num_frames`` uniformly spaced RGB frames and a mono waveform.

    ``video_path`` and ``audio_path`` may be the same file. Returns
    ``frames``: uint8 ``(num_frames, frame_height, frame_width, 3)`` and
    ``waveform``: float32 ``(round(clip_seconds * sample_rate_hz),)``.

    Raises :class:`BadMediaError` for a missing / unreadable / empty / non-media / truncated file,
    a file lacking the needed stream, or, before anything is decoded, a video whose frames have
    more than ``max_source_pixels`` pixels (source width * height) or a file that declares a
    duration over ``max_source_seconds``.
    """
    if num_frames <= 0 or frame_height <= 0 or frame_width <= 0 or sample_rate_hz <= 0:
        raise ValueError(
            "num_frames, frame_height, frame_width and sample_rate_hz must be positive, got "
            f"{num_frames}, {frame_height}, {frame_width}, {sample_rate_hz}"
        )
    if not clip_seconds > 0:
        raise ValueError(f"clip_seconds must be positive, got {clip_seconds}")
    if not (max_source_pixels > 0 and max_source_seconds > 0):
        raise ValueError(
            "max_source_pixels and max_source_seconds must be positive, got "
            f"{max_source_pixels}, {max_source_seconds}"
        )
    video_path, audio_path = Path(video_path), Path(audio_path)
    shared = video_path == audio_path or os.path.abspath(video_path) == os.path.abspath(audio_path)
    collector = _AudioCollector(sample_rate_hz, clip_num_samples(clip_seconds, sample_rate_hz))

    # Open the video file first, so a bad or oversized video is reported before the audio file is
    # touched; its frame size and duration are checked before anything is decoded.
    container = _open(video_path, known_format=True)
    try:
        if not container.streams.video:
            raise BadMediaError(video_path, "no video stream")
        video = container.streams.video[0]
        _check_source_limits(video_path, container, video, max_source_pixels, max_source_seconds)
        _single_threaded(video)
        audio = None
        if shared:
            if not container.streams.audio:
                raise BadMediaError(video_path, "no audio stream")
            audio = container.streams.audio[0]
        else:
            _decode_audio_only(audio_path, collector, max_source_seconds)
        window_start = _stream_start(video)
        window_end = window_start + clip_seconds
        video_scale = _time_scale(video)

        # Demux first, keeping the compressed video packets (small): the number of frames in the
        # window must be known before choosing which ones to convert. Demuxing stops once the
        # decode timestamp passes the window (dts is monotonic and dts <= pts, so no later packet
        # can belong to the window) and the audio window is complete.
        packets: list[av.Packet] = []
        times: list[float] = []  # presentation times (s) of the kept packets that have one
        frames_in_window = 0
        video_done = False
        streams = [video] if audio is None else [video, audio]
        add_audio = collector.add
        target = collector.target
        try:
            for packet in container.demux(*streams):
                # Demuxed packets carry the container's own stream objects (the end-of-stream
                # flush packets too), so identity tells the streams apart.
                if packet.stream is audio:
                    if collector.count < target:
                        for frame in packet.decode():
                            add_audio(frame)
                elif not video_done:
                    if packet.size == 0:  # end-of-stream flush packet
                        continue
                    dts = packet.dts
                    if dts is not None and dts * video_scale >= window_end:
                        video_done = True
                        continue
                    packets.append(packet)
                    pts = packet.pts
                    if pts is None:
                        frames_in_window += 1
                    else:
                        pts_seconds = pts * video_scale
                        times.append(pts_seconds)
                        if pts_seconds < window_end:
                            frames_in_window += 1
                if video_done and (audio is None or collector.count >= target):
                    break
            if audio is not None:
                add_audio(None)
        except av.error.FFmpegError as err:
            raise BadMediaError(
                video_path, f"truncated or corrupt stream ({_ffmpeg_message(err)})"
            ) from None
        if audio is not None and collector.count == 0:
            raise BadMediaError(video_path, "audio stream has no decodable samples")
        if frames_in_window == 0:
            raise BadMediaError(video_path, "video stream has no frames")

        frames = _convert_selected(
            video_path, video, video_scale, packets, frames_in_window, num_frames,
            window_end, frame_height, frame_width,
        )
        if frames is None:
            # The decoder produced fewer frames than there were packets (dropped / undecodable
            # packets): decode again from the start, this time keeping every frame in the window.
            frames = _decode_all_then_select(
                video_path, num_frames, window_end, frame_height, frame_width,
                max_source_pixels, max_source_seconds,
            )
        declared = _seconds(video.duration, video.time_base)
        if declared is None and container.duration is not None:
            declared = container.duration / av.time_base
        _check_coverage(video_path, video, times, window_start, clip_seconds, declared)
    finally:
        container.close()
    return torch.from_numpy(frames), collector.waveform()


def _check_coverage(
    path: Path,
    stream: av.stream.Stream,
    times: list[float],
    window_start: float,
    clip_seconds: float,
    declared: float | None,
) -> None:
    """Raise if the demuxed video covers much less than the container's declared duration.

    ``times``: presentation times in seconds of the demuxed video packets that have one.
    """
    if declared is None or declared <= 0:
        return
    if not times:
        return
    rate = stream.average_rate or stream.guessed_rate
    frame_duration = 1.0 / float(rate) if rate else 0.0
    covered = max(times) + frame_duration - window_start
    expected = min(declared, clip_seconds)
    if covered < _MIN_DECLARED_COVERAGE * expected:
        raise BadMediaError(
            path,
            f"truncated: video stream ends after {covered:.3f} s but the container declares "
            f"{declared:.3f} s",
        )


def _convert_selected(
    path: Path,
    stream: av.stream.Stream,
    scale: float,
    packets: list[av.Packet],
    frames_in_window: int,
    num_frames: int,
    window_end: float,
    height: int,
    width: int,
) -> np.ndarray | None:
    """Decode ``packets`` in order, converting only the uniformly chosen frames.

    ``scale``: seconds per timestamp tick of ``stream``. Returns uint8
    ``(num_frames, height, width, 3)``, or ``None`` when the decoder yields fewer
    in-window frames than expected.
    """
    wanted = uniform_frame_indices(frames_in_window, num_frames)
    last_wanted = wanted[-1]
    wanted_set = set(wanted)
    reformatter = _new_reformatter()
    by_index: dict[int, np.ndarray] = {}
    position = 0
    decode = stream.codec_context.decode

    def decoded():
        for packet in packets:
            yield from decode(packet)
        yield from decode(None)  # drain reordered frames

    try:
        for frame in decoded():
            pts = frame.pts
            if pts is not None and pts * scale >= window_end:
                continue
            if position in wanted_set:
                by_index[position] = _frame_to_rgb(reformatter, frame, height, width)
            position += 1
            if position > last_wanted:
                break
    except av.error.FFmpegError as err:
        raise BadMediaError(path, f"truncated or corrupt video stream ({_ffmpeg_message(err)})") from None
    if len(by_index) != len(wanted_set):
        return None
    return _stack([by_index[index] for index in wanted], height, width)


def _stack(frames: list[np.ndarray], height: int, width: int) -> np.ndarray:
    out = np.empty((len(frames), height, width, 3), dtype=np.uint8)
    for i, frame in enumerate(frames):
        out[i] = frame
    return out


def _decode_all_then_select(
    path: Path,
    num_frames: int,
    window_end: float,
    height: int,
    width: int,
    max_pixels: int = DEFAULT_MAX_SOURCE_PIXELS,
    max_seconds: float = DEFAULT_MAX_SOURCE_SECONDS,
) -> np.ndarray:
    """Decode every frame of the window, then take the uniformly chosen ones.

    Two passes, so memory stays at ``num_frames`` converted frames whatever the window holds: the
    first counts the frames the decoder yields in the window (keeping none), the second decodes
    again and converts only the chosen ones.
    """
    count, _ = _scan_window(path, window_end, max_pixels, max_seconds)
    if count == 0:
        raise BadMediaError(path, "video stream has no decodable frames")
    wanted = uniform_frame_indices(count, num_frames)
    _, by_index = _scan_window(
        path, window_end, max_pixels, max_seconds, wanted=set(wanted), height=height, width=width
    )
    if len(by_index) != len(set(wanted)):  # the decoder yielded fewer frames the second time
        raise BadMediaError(path, "video stream does not decode the same way twice")
    return _stack([by_index[index] for index in wanted], height, width)


def _scan_window(
    path: Path,
    window_end: float,
    max_pixels: int,
    max_seconds: float,
    *,
    wanted: set[int] | None = None,
    height: int = 0,
    width: int = 0,
) -> tuple[int, dict[int, np.ndarray]]:
    """Decode the video stream of ``path`` from the start, numbering the frames before
    ``window_end``: returns how many there are (up to the last wanted one) and the ``wanted``
    ones converted to RGB ``(height, width, 3)``. No decoded frame is kept beyond its turn."""
    container = _open(path, known_format=True)
    by_index: dict[int, np.ndarray] = {}
    position = 0
    try:
        if not container.streams.video:
            raise BadMediaError(path, "no video stream")
        stream = container.streams.video[0]
        _check_source_limits(path, container, stream, max_pixels, max_seconds)
        _single_threaded(stream)
        scale = _time_scale(stream)
        reformatter = _new_reformatter() if wanted else None
        last_wanted = max(wanted) if wanted else None
        for frame in container.decode(stream):
            if frame.pts is not None and frame.pts * scale >= window_end:
                continue
            if wanted is not None and position in wanted:
                by_index[position] = _frame_to_rgb(reformatter, frame, height, width)
            position += 1
            if last_wanted is not None and position > last_wanted:
                break
    except av.error.FFmpegError as err:
        raise BadMediaError(path, f"truncated or corrupt video stream ({_ffmpeg_message(err)})") from None
    finally:
        container.close()
    return position, by_index


def clip_num_samples(clip_seconds: float, sample_rate_hz: int) -> int:
    """Number of audio samples in a clip: ``round(clip_seconds * sample_rate_hz)``."""
    return int(round(clip_seconds * sample_rate_hz))
