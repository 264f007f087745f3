"""Bounded decoding: DecodeParams size fields have upper bounds, and decode_clip refuses source media
over a frame-size or duration limit before decoding anything, naming the file and the limit (issue 16,
item 2). Real PyAV-encoded clips, no mocked media."""
from __future__ import annotations

from pathlib import Path

import av
import numpy as np
import pytest
import torch

import test_media
import workers.media as media
from orchestrator.specs import SpecError, load_spec
from workers.cache import cache_key
from workers.media import BadMediaError, decode_clip
from workers.specs import DecodeParams

DECODE = dict(num_frames=2, frame_height=32, frame_width=32, sample_rate_hz=16000, clip_seconds=1.0)


def _write_video(path: Path, frames: np.ndarray, fps: int, *, audio: np.ndarray | None = None, sr: int = 16000) -> None:
    """tests/test_media.py's writer, with libx264's fastest preset (these clips are large)."""
    test_media._write_video(path, frames, fps, audio=audio, sr=sr, preset="ultrafast")


def _write_wav(path: Path, seconds: float, sr: int = 16000) -> None:
    """Mono PCM s16 wav holding a quiet 440 Hz tone."""
    t = np.arange(int(seconds * sr)) / sr
    pcm = np.round(0.2 * np.sin(2 * np.pi * 440 * t) * 32767).astype(np.int16)
    with av.open(str(path), "w", format="wav") as container:
        stream = container.add_stream("pcm_s16le", rate=sr, layout="mono")
        frame = av.AudioFrame.from_ndarray(pcm[None], format="s16", layout="mono")
        frame.sample_rate, frame.pts = sr, 0
        for packet in stream.encode(frame):
            container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def _ramp(count: int, height: int, width: int) -> np.ndarray:
    """Frame i has brightness 12 * i."""
    return np.stack([np.full((height, width, 3), 12 * i, np.uint8) for i in range(count)])


@pytest.fixture(scope="module")
def clips(tmp_path_factory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("bounds")
    files = {}
    # 1920x1088 (2,088,960 pixels), 0.5 s at 4 fps, with audio in the same file
    files["large"] = base / "large.mp4"
    _write_video(files["large"], _ramp(2, 1088, 1920), fps=4, audio=np.zeros(8000, np.float32))
    # 5 s at 4 fps, 32x32, video only; its audio comes from separate wavs
    files["long"] = base / "long.mp4"
    _write_video(files["long"], _ramp(20, 32, 32), fps=4)
    files["short_wav"] = base / "short.wav"
    _write_wav(files["short_wav"], 1.0)
    files["long_wav"] = base / "long.wav"
    _write_wav(files["long_wav"], 5.0)
    files["short"] = base / "short.mp4"  # 1 s at 8 fps, 32x32
    _write_video(files["short"], _ramp(8, 32, 32), fps=8)
    return files


@pytest.fixture()
def no_decoding(monkeypatch):
    """Fail the test if anything is decoded: the limits must be checked first."""
    def refuse(*args, **kwargs):
        raise AssertionError("decoded before the source limits were checked")

    monkeypatch.setattr(media, "_convert_selected", refuse)
    monkeypatch.setattr(media, "_decode_all_then_select", refuse)
    monkeypatch.setattr(media, "_decode_audio_only", refuse)
    monkeypatch.setattr(media._AudioCollector, "add", refuse)


# ---- refusing source media over the limits ---------------------------------------------------


def test_oversized_frames_are_refused_before_decoding_naming_file_and_limit(clips, no_decoding):
    path = clips["large"]
    with pytest.raises(BadMediaError) as caught:
        decode_clip(path, path, **DECODE, max_source_pixels=640 * 480)
    err = caught.value
    assert err.path == str(path)
    assert err.problem == "source frames 1920x1088 (2088960 pixels) exceed max_source_pixels 307200"
    assert str(err) == f"{path}: {err.problem}"


def test_over_long_video_is_refused_before_decoding_naming_file_and_limit(clips, no_decoding):
    path = clips["long"]
    with pytest.raises(BadMediaError) as caught:
        decode_clip(path, clips["short_wav"], **DECODE, max_source_seconds=2)
    err = caught.value
    assert err.path == str(path)
    assert err.problem.startswith("duration ") and err.problem.endswith(" s exceeds max_source_seconds 2")
    assert float(err.problem.split()[1]) == pytest.approx(5.0, abs=0.1)


def test_over_long_separate_audio_file_is_refused_naming_the_wav(clips):
    with pytest.raises(BadMediaError) as caught:
        decode_clip(clips["short"], clips["long_wav"], **DECODE, max_source_seconds=2)
    err = caught.value
    assert err.path == str(clips["long_wav"])
    assert err.problem == "duration 5.000 s exceeds max_source_seconds 2"


def test_fallback_path_checks_the_limits_too(clips):
    path = clips["large"]
    with pytest.raises(BadMediaError, match=r"exceed max_source_pixels 307200") as caught:
        media._decode_all_then_select(path, 2, 1.0, 32, 32, 640 * 480, 600.0)
    assert caught.value.path == str(path)
    with pytest.raises(BadMediaError, match=r"exceeds max_source_seconds 2$") as caught:
        media._decode_all_then_select(clips["long"], 2, 1.0, 32, 32, 10**9, 2.0)
    assert caught.value.path == str(clips["long"])


def test_limits_must_be_positive(clips):
    with pytest.raises(ValueError, match="max_source_pixels"):
        decode_clip(clips["short"], clips["short_wav"], **DECODE, max_source_pixels=0)
    with pytest.raises(ValueError, match="max_source_seconds"):
        decode_clip(clips["short"], clips["short_wav"], **DECODE, max_source_seconds=-1)


# ---- media within the limits still decodes ---------------------------------------------------


def test_clips_within_the_limits_decode(clips):
    # 1920x1088 is within the default (4K) frame limit
    frames, wave = decode_clip(clips["large"], clips["large"], **{**DECODE, "clip_seconds": 0.5})
    assert frames.shape == (2, 32, 32, 3) and wave.shape == (8000,)
    assert frames.float().mean(dim=(1, 2, 3)).tolist() == pytest.approx([0, 12], abs=4)
    # exactly at the limit is allowed
    frames, _ = decode_clip(clips["large"], clips["large"], **DECODE, max_source_pixels=1920 * 1088)
    assert frames.shape == (2, 32, 32, 3)
    # the 5 s clip under a 10 s limit, and under the default one
    for limit in (10.0, media.DEFAULT_MAX_SOURCE_SECONDS):
        frames, wave = decode_clip(clips["long"], clips["long_wav"], **DECODE, max_source_seconds=limit)
        assert frames.shape == (2, 32, 32, 3) and wave.shape == (16000,)
        # the first 1 s holds frames 0..3: floor((2k + 1) * 4 / 4) -> 1, 3
        assert frames.float().mean(dim=(1, 2, 3)).tolist() == pytest.approx([12, 36], abs=4)


def test_fallback_keeps_only_the_sampled_frames_and_matches_the_main_path(clips, monkeypatch):
    path, wav = clips["long"], clips["short_wav"]
    decode = {**DECODE, "num_frames": 3, "clip_seconds": 4.0}
    expected, expected_wave = decode_clip(path, wav, **decode)
    conversions = []
    convert = media._frame_to_rgb

    def counting(reformatter, frame, height, width):
        conversions.append((frame.width, frame.height))
        return convert(reformatter, frame, height, width)

    monkeypatch.setattr(media, "_frame_to_rgb", counting)
    monkeypatch.setattr(media, "_convert_selected", lambda *args, **kwargs: None)  # force the fallback
    got, wave = decode_clip(path, wav, **decode)
    assert torch.equal(got, expected) and torch.equal(wave, expected_wave)
    # 16 frames in the 4 s window; only the 3 sampled ones (2, 8, 13) are converted, none kept full size
    assert len(conversions) == 3


# ---- DecodeParams: bounds and the new fields -------------------------------------------------


@pytest.mark.parametrize(
    "field,value",
    [
        ("clip_seconds", 1e9),
        ("clip_seconds", 61),
        ("frame_height", 100000),
        ("frame_width", 100000),
        ("frame_height", 1025),
        ("num_frames", 257),
        ("sample_rate_hz", 192000),
        ("n_mels", 100000),
        ("win_ms", 1e6),
        ("hop_ms", 1e6),
        ("max_source_pixels", 0),
        ("max_source_seconds", 0),
        ("max_source_seconds", float("inf")),
    ],
)
def test_spec_refuses_unbounded_decode_sizes_naming_the_field(field, value):
    with pytest.raises(SpecError) as caught:
        load_spec({"data": {"decode": {field: value}}})
    assert f"data.decode.{field}" in str(caught.value), str(caught.value)


def test_spec_accepts_the_upper_bounds():
    """Each field's own bound is accepted; together they are bounded by the bytes of a decoded clip (issue 30)."""
    spec = load_spec({"data": {"decode": {"clip_seconds": 60, "sample_rate_hz": 96000, "frame_height": 1024,
                                          "frame_width": 1024, "num_frames": 48}}})
    assert spec.data.decode.clip_seconds == 60 and spec.data.decode.frame_height == 1024
    assert load_spec({"data": {"decode": {"num_frames": 256, "frame_height": 256, "frame_width": 256}}})


def test_source_limit_defaults_fit_the_public_datasets():
    params = DecodeParams()
    assert params.max_source_pixels == media.DEFAULT_MAX_SOURCE_PIXELS == 3840 * 2160  # up to 4K frames
    assert params.max_source_seconds == media.DEFAULT_MAX_SOURCE_SECONDS == 600.0  # 10 s clips, whole videos
    assert DecodeParams.model_fields["max_source_pixels"].description
    assert DecodeParams.model_fields["max_source_seconds"].description


def test_source_limits_at_their_defaults_leave_the_cache_key_unchanged():
    default = DecodeParams()
    dumped = default.model_dump(mode="json")
    assert "max_source_pixels" not in dumped and "max_source_seconds" not in dumped
    explicit = DecodeParams(max_source_pixels=3840 * 2160, max_source_seconds=600)
    assert cache_key(explicit) == cache_key(default)
    tighter = DecodeParams(max_source_pixels=640 * 480)
    assert tighter.model_dump(mode="json")["max_source_pixels"] == 640 * 480
    assert cache_key(tighter) != cache_key(default)
    assert cache_key(DecodeParams(max_source_seconds=30)) != cache_key(default)


def test_non_default_limits_survive_a_spec_round_trip():
    spec = load_spec({"data": {"decode": {"max_source_pixels": 1000, "max_source_seconds": 12.5}}})
    again = load_spec(spec.model_dump(mode="json"))
    assert again.data.decode.max_source_pixels == 1000 and again.data.decode.max_source_seconds == 12.5
    assert again == spec
