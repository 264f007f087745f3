"""Generated media, PyAV decoding and audio features, on real encoded files (no mocks)."""
from __future__ import annotations

import csv
import json
import math
import os
import shutil
from collections import Counter
from pathlib import Path

import av
import numpy as np
import pytest
import torch

from conftest import SMALL_SET
from workers.features import log_mel, spectrogram_ogm
from workers.media import BadMediaError, decode_clip, probe_media
from orchestrator.synth import synthesize_dataset

DECODE = dict(num_frames=4, frame_height=32, frame_width=32, sample_rate_hz=16000, clip_seconds=1.0)


def _rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def _first_clip(root: Path) -> Path:
    return root / _rows(root / "manifest.csv")[0]["path"]


def _write_video(path: Path, frames: np.ndarray, fps: int, *, audio: np.ndarray | None = None, sr: int = 16000,
                 preset: str | None = None) -> None:
    """Encode ``frames`` (T, H, W, 3) uint8 with libx264 (+ optional mono AAC audio); `preset` e.g.
    "ultrafast" for large frames."""
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = frames.shape[2], frames.shape[1], "yuv420p"
        stream.codec_context.options = {"qp": "10", **({"preset": preset} if preset else {})}
        a_stream = container.add_stream("aac", rate=sr, layout="mono") if audio is not None else None
        for i, image in enumerate(frames):
            frame = av.VideoFrame.from_ndarray(image, format="rgb24").reformat(format="yuv420p")
            frame.pts = i
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
        if a_stream is not None:
            for start in range(0, len(audio), 1024):
                frame = av.AudioFrame.from_ndarray(audio[None, start : start + 1024], format="fltp", layout="mono")
                frame.sample_rate, frame.pts = sr, start
                for packet in a_stream.encode(frame):
                    container.mux(packet)
            for packet in a_stream.encode():
                container.mux(packet)


def _write_wav(path: Path, samples: np.ndarray, sr: int) -> None:
    """PCM s16 wav; ``samples`` (channels, N) float in [-1, 1]."""
    layout = "mono" if samples.shape[0] == 1 else "stereo"
    with av.open(str(path), "w", format="wav") as container:
        stream = container.add_stream("pcm_s16le", rate=sr, layout=layout)
        pcm = np.round(samples * 32767).astype(np.int16)
        # packed s16: interleave channels into one row
        frame = av.AudioFrame.from_ndarray(pcm.T.reshape(1, -1), format="s16", layout=layout)
        frame.sample_rate, frame.pts = sr, 0
        for packet in stream.encode(frame):
            container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


# ---- synthesis -----------------------------------------------------------------------------


def test_synth_is_deterministic_for_a_seed(tmp_path):
    params = dict(classes=3, clips_per_class=4, clip_seconds=0.5, fps=8, height=32, width=32, seed=5)
    card_a = synthesize_dataset(tmp_path / "a", **params)
    card_b = synthesize_dataset(tmp_path / "b", **params)
    card_c = synthesize_dataset(tmp_path / "c", **{**params, "seed": 6})
    assert card_a == card_b
    for name in ("manifest.csv", "signatures.csv", "classes.txt", "card.json"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name
    for row in _rows(tmp_path / "a" / "manifest.csv"):
        a = decode_clip(tmp_path / "a" / row["path"], tmp_path / "a" / row["path"], **{**DECODE, "clip_seconds": 0.5})
        b = decode_clip(tmp_path / "b" / row["path"], tmp_path / "b" / row["path"], **{**DECODE, "clip_seconds": 0.5})
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    # another seed draws other splits / informative flags
    assert _rows(tmp_path / "a" / "signatures.csv") != _rows(tmp_path / "c" / "signatures.csv")
    assert card_c["seed"] == 6


# 4 classes x 10 clips: 24 train / 8 val / 8 test; 0.3125 * 8 = 2.5 and 0.5625 * 8 = 4.5 round up
@pytest.mark.parametrize("p_audio,p_visual", [(0.7, 0.35), (0.9, 0.6), (1.0, 0.0), (0.3125, 0.5625)])
def test_informative_fractions_are_exact_per_split(tmp_path, p_audio, p_visual):
    classes, per_class = 4, 10
    card = synthesize_dataset(
        tmp_path, classes=classes, clips_per_class=per_class, clip_seconds=0.25, fps=8, height=16, width=16,
        audio_informative=p_audio, visual_informative=p_visual, seed=11,
    )
    rows = _rows(tmp_path / "signatures.csv")
    assert len(rows) == classes * per_class
    for split in ("train", "val", "test"):
        members = [r for r in rows if r["split"] == split]
        n = len(members)
        assert n > 0
        for modality, p in (("audio", p_audio), ("visual", p_visual)):
            expected = math.floor(p * n + 0.5)  # round half up, by hand
            flags = [int(r[f"{modality}_informative"]) for r in members]
            assert sum(flags) == expected, (split, modality)
            # the flag agrees with the signature actually used
            for r in members:
                assert (r[f"{modality}_signature"] == r["label"]) == bool(int(r[f"{modality}_informative"]))
            # stratified: each class gets floor or ceil of its proportional share
            for c in {r["label"] for r in members}:
                n_c = sum(1 for r in members if r["label"] == c)
                got = sum(1 for r in members if r["label"] == c and int(r[f"{modality}_informative"]))
                assert abs(got - expected * n_c / n) < 1.0 + 1e-9
            assert card["informative_realised"][split][modality] == pytest.approx(expected / n)
            assert card["informative_realised"][split][f"{modality}_informative_clips"] == expected


def test_card_reports_counts_and_best_accuracy_from_the_signatures(synth_dataset):
    card = json.loads((synth_dataset / "card.json").read_text())
    rows = _rows(synth_dataset / "signatures.csv")
    assert card["classes"] == ["class_00", "class_01", "class_02"]
    assert card["seed"] == SMALL_SET["seed"]
    for key, value in SMALL_SET.items():
        assert card["params"][key] == value
    # 8 clips per class: 1 test (0.15*8 = 1.2 -> 1), 1 val, 6 train
    for name in card["classes"]:
        assert (card["counts"]["train"][name], card["counts"]["val"][name], card["counts"]["test"][name]) == (6, 1, 1)
    for split in ("train", "val", "test"):
        members = [r for r in rows if r["split"] == split]
        for modality in ("audio", "visual"):
            # best classifier on a signature predicts the label most frequent with it
            table: dict[str, Counter] = {}
            for r in members:
                table.setdefault(r[f"{modality}_signature"], Counter())[r["label"]] += 1
            best = sum(max(c.values()) for c in table.values()) / len(members)
            assert card["best_achievable_accuracy"][split][modality] == pytest.approx(best)
    # expected accuracy formula, by hand: max(p, (1 - p) / (K - 1)) with K = 3
    assert card["best_achievable_accuracy_expected"]["audio"] == pytest.approx(0.9)
    assert card["best_achievable_accuracy_expected"]["visual"] == pytest.approx(0.6)
    manifest = _rows(synth_dataset / "manifest.csv")
    assert {r["split"] for r in manifest} == {"train", "val", "test"}
    assert all((synth_dataset / r["path"]).is_file() for r in manifest)


def test_expected_accuracy_below_chance_prefers_another_class(tmp_path):
    card = synthesize_dataset(tmp_path, classes=3, clips_per_class=3, clip_seconds=0.25, fps=4, height=16,
                              width=16, audio_informative=0.1, visual_informative=1.0)
    # p = 0.1 < 1/3: the best guess is one of the other two classes, (1 - 0.1) / 2 = 0.45
    assert card["best_achievable_accuracy_expected"]["audio"] == pytest.approx(0.45)


def test_signatures_survive_encoding(tmp_path):
    """With fully informative modalities, nearest-class-mean on simple features separates classes."""
    synthesize_dataset(tmp_path, classes=4, clips_per_class=6, clip_seconds=0.5, fps=8, height=32, width=32,
                       audio_informative=1.0, visual_informative=1.0, seed=2)
    rows = _rows(tmp_path / "manifest.csv")
    feats_a, feats_v, labels, splits = [], [], [], []
    for r in rows:
        path = tmp_path / r["path"]
        frames, wave = decode_clip(path, path, **{**DECODE, "clip_seconds": 0.5})
        feats_a.append(log_mel(wave, 16000)[0].mean(0))
        pixels = frames.reshape(-1, 3).float()
        coloured = pixels[(pixels - 110).abs().max(1).values > 60]  # object pixels, not grey background
        feats_v.append(coloured.mean(0))
        labels.append(r["label"])
        splits.append(r["split"])
    for feats in (feats_a, feats_v):
        x = torch.stack(feats)
        names = sorted(set(labels))
        train = [i for i, s in enumerate(splits) if s == "train"]
        centroids = torch.stack([x[[i for i in train if labels[i] == n]].mean(0) for n in names])
        held_out = [i for i, s in enumerate(splits) if s != "train"]
        predicted = torch.cdist(x[held_out], centroids).argmin(1)
        correct = sum(names[p] == labels[i] for p, i in zip(predicted.tolist(), held_out))
        assert correct == len(held_out)


def test_noise_knobs_set_each_modality_difficulty_alone(tmp_path):
    """audio_noise_std / visual_noise_std: defaults reproduce the original clips byte for byte (and
    stay out of the card); a non-default level changes only its own modality's media."""
    params = dict(classes=3, clips_per_class=3, clip_seconds=0.5, fps=8, height=32, width=32,
                  audio_informative=1.0, visual_informative=1.0, seed=4)
    card_plain = synthesize_dataset(tmp_path / "plain", **params)
    synthesize_dataset(tmp_path / "defaults", audio_noise_std=0.03, visual_noise_std=12.0, **params)
    card_audio = synthesize_dataset(tmp_path / "audio", audio_noise_std=0.3, **params)
    card_visual = synthesize_dataset(tmp_path / "visual", visual_noise_std=40.0, **params)
    assert "audio_noise_std" not in card_plain["params"] and "visual_noise_std" not in card_plain["params"]
    assert card_audio["params"]["audio_noise_std"] == 0.3 and "visual_noise_std" not in card_audio["params"]
    assert card_visual["params"]["visual_noise_std"] == 40.0
    # Noise changes how hard a signature is to recognise, not which signature a clip carries.
    for card in (card_audio, card_visual):
        assert card["best_achievable_accuracy"] == card_plain["best_achievable_accuracy"]
    for name in ("manifest.csv", "signatures.csv", "card.json"):
        assert (tmp_path / "defaults" / name).read_bytes() == (tmp_path / "plain" / name).read_bytes(), name
    decode = {**DECODE, "clip_seconds": 0.5}
    audio_std, pixel_std = Counter(), Counter()  # sums over clips
    for row in _rows(tmp_path / "plain" / "manifest.csv"):
        assert (tmp_path / "defaults" / row["path"]).read_bytes() == (tmp_path / "plain" / row["path"]).read_bytes()
        clips = {}
        for variant in ("plain", "audio", "visual"):
            path = tmp_path / variant / row["path"]
            clips[variant] = decode_clip(path, path, **decode)
        frames, wave = clips["plain"]
        assert torch.equal(clips["audio"][0], frames) and not torch.equal(clips["audio"][1], wave)
        assert torch.equal(clips["visual"][1], wave) and not torch.equal(clips["visual"][0], frames)
        for variant, (f, w) in clips.items():
            audio_std[variant] += float(w.std())
            # neighbouring-pixel differences: pixel noise, plus the object's few edge pixels
            pixel_std[variant] += float(f.float().diff(dim=2).abs().mean())
    assert audio_std["audio"] > 1.5 * audio_std["plain"]
    assert pixel_std["visual"] > 1.5 * pixel_std["plain"]
    with pytest.raises(ValueError, match="audio_noise_std"):
        synthesize_dataset(tmp_path / "x", audio_noise_std=-0.1)
    with pytest.raises(ValueError, match="visual_noise_std"):
        synthesize_dataset(tmp_path / "x", visual_noise_std=float("nan"))


def test_synth_rejects_bad_parameters_naming_the_field(tmp_path):
    with pytest.raises(ValueError, match="audio_informative"):
        synthesize_dataset(tmp_path / "x", audio_informative=1.5)
    with pytest.raises(ValueError, match="layout"):
        synthesize_dataset(tmp_path / "x", layout="kinetics")
    with pytest.raises(ValueError, match="classes"):
        synthesize_dataset(tmp_path / "x", layout="cremad", classes=7)
    with pytest.raises(ValueError, match="split_fractions"):
        synthesize_dataset(tmp_path / "x", split_fractions=(0.5, 0.5, 0.5))
    assert not (tmp_path / "x").exists()  # validated before anything is written


# ---- decoding -----------------------------------------------------------------------------


def test_probe_reports_streams(synth_dataset):
    info = probe_media(_first_clip(synth_dataset))
    assert info["video"]["codec"] == "h264"
    assert (info["video"]["width"], info["video"]["height"]) == (32, 32)
    assert info["video"]["fps"] == pytest.approx(8.0)
    assert info["audio"]["codec"] == "aac"
    assert info["audio"]["sample_rate_hz"] == 16000 and info["audio"]["channels"] == 1
    assert info["duration_s"] == pytest.approx(1.0, abs=0.07)


def test_decode_shapes_and_dtypes(synth_dataset):
    path = _first_clip(synth_dataset)
    frames, wave = decode_clip(path, path, num_frames=5, frame_height=24, frame_width=40,
                               sample_rate_hz=8000, clip_seconds=1.0)
    assert frames.dtype == torch.uint8 and tuple(frames.shape) == (5, 24, 40, 3)
    assert wave.dtype == torch.float32 and tuple(wave.shape) == (8000,)
    assert 0.05 < wave.abs().max() <= 1.0


def test_frames_are_sampled_uniformly(tmp_path):
    # 12 frames, frame i has brightness 20 * i
    frames = np.stack([np.full((32, 32, 3), 20 * i, np.uint8) for i in range(12)])
    path = tmp_path / "ramp.mp4"
    _write_video(path, frames, fps=12)
    got, _ = decode_clip(path, _silent_wav(tmp_path), **DECODE)
    # segment centres floor((2k + 1) * 12 / 8) for k = 0..3 -> frames 1, 4, 7, 10
    brightness = got.float().mean(dim=(1, 2, 3))
    assert brightness.tolist() == pytest.approx([20, 80, 140, 200], abs=4)
    # a 0.5 s window holds frames 0..5: floor((2k + 1) * 6 / 8) -> 0, 2, 3, 5
    got, _ = decode_clip(path, _silent_wav(tmp_path), **{**DECODE, "clip_seconds": 0.5})
    assert got.float().mean(dim=(1, 2, 3)).tolist() == pytest.approx([0, 40, 60, 100], abs=4)
    # more frames than available: indices repeat, floor((2k + 1) * 12 / 32) -> 0,1,1,2,3,3,4,5,...
    got, _ = decode_clip(path, _silent_wav(tmp_path), **{**DECODE, "num_frames": 16})
    expected = [20 * (((2 * k + 1) * 12) // 32) for k in range(16)]
    assert got.float().mean(dim=(1, 2, 3)).tolist() == pytest.approx(expected, abs=4)


def _silent_wav(tmp_path: Path) -> Path:
    path = tmp_path / "silence.wav"
    if not path.exists():
        _write_wav(path, np.zeros((1, 16000)), 16000)
    return path


def test_audio_is_resampled_to_mono_and_padded(tmp_path):
    sr_in = 44100
    t = np.arange(sr_in // 2) / sr_in  # 0.5 s
    left = 0.5 * np.sin(2 * np.pi * 440 * t)
    right = 0.3 * np.sin(2 * np.pi * 440 * t)
    wav = tmp_path / "tone.wav"
    _write_wav(wav, np.stack([left, right]), sr_in)
    video = tmp_path / "v.mp4"
    _write_video(video, np.zeros((8, 32, 32, 3), np.uint8), fps=8)
    _, wave = decode_clip(video, wav, **DECODE)  # 1 s requested at 16 kHz from a 0.5 s file
    assert wave.shape == (16000,)
    # zero padding after the 0.5 s of signal (resampler tail aside)
    assert torch.count_nonzero(wave[8200:]) == 0
    body = wave[1000:7000].numpy()
    spectrum = np.abs(np.fft.rfft(body * np.hanning(len(body))))
    peak_hz = np.argmax(spectrum) * 16000 / len(body)
    assert peak_hz == pytest.approx(440, abs=16000 / len(body))
    # mono = mean of the channels: amplitude (0.5 + 0.3) / 2 = 0.4
    assert np.abs(body).max() == pytest.approx(0.4, abs=0.02)


def test_separate_audio_and_video_files(synth_layouts):
    root = synth_layouts["cremad"]
    flv = sorted((root / "VideoFlash").glob("*.flv"))[0]
    wav = root / "AudioWAV" / (flv.stem + ".wav")
    frames, wave = decode_clip(flv, wav, **{**DECODE, "clip_seconds": 0.5})
    assert frames.shape == (4, 32, 32, 3) and wave.shape == (8000,)
    assert probe_media(flv)["audio"] is None  # CREMA-D style: video-only flv, audio in the wav


# ---- bad media -------------------------------------------------------------------------------


@pytest.fixture()
def bad_files(tmp_path, synth_dataset, synth_layouts):
    good = _first_clip(synth_dataset)
    data = good.read_bytes()
    files = {}
    files["truncated"] = tmp_path / "truncated.mp4"
    files["truncated"].write_bytes(data[: len(data) // 2])
    files["truncated_tail"] = tmp_path / "truncated_tail.mp4"  # cut inside the trailing moov box
    files["truncated_tail"].write_bytes(data[:-40])
    wav = sorted((synth_layouts["cremad"] / "AudioWAV").glob("*.wav"))[0]
    files["truncated_wav"] = tmp_path / "truncated.wav"
    files["truncated_wav"].write_bytes(wav.read_bytes()[:3000])
    files["non_media"] = tmp_path / "notes.mp4"
    files["non_media"].write_text("this is a text file, not a video\n" * 20)
    files["empty"] = tmp_path / "empty.mp4"
    files["empty"].touch()
    files["no_audio"] = tmp_path / "silent.mp4"
    _write_video(files["no_audio"], np.zeros((4, 32, 32, 3), np.uint8), fps=8)
    files["no_video"] = wav
    files["missing"] = tmp_path / "missing.mp4"
    files["directory"] = tmp_path / "folder.mp4"
    files["directory"].mkdir()
    files["good"] = good
    return files


@pytest.mark.parametrize(
    "case,problem",
    [
        ("truncated", "truncated MP4 file"),
        ("truncated_tail", "truncated MP4 file (box 'moov'"),
        ("truncated_wav", "truncated WAV file"),
        ("non_media", "not a media file"),
        ("empty", "file is empty (0 bytes)"),
        ("no_audio", "no audio stream"),
        ("no_video", "no video stream"),
        ("missing", "file not found"),
        ("directory", "not a regular file"),
    ],
)
def test_bad_media_errors_name_the_file_and_problem(bad_files, case, problem):
    path = bad_files[case]
    audio = path
    video = bad_files["good"] if case == "truncated_wav" else path  # a bad wav beside a good video
    with pytest.raises(BadMediaError) as caught:
        decode_clip(video, audio, **DECODE)
    err = caught.value
    assert err.path == str(path)
    assert problem in err.problem
    assert str(err) == f"{path}: {err.problem}"
    assert isinstance(err, ValueError)


def test_unreadable_path_inside_a_file(bad_files):
    path = bad_files["good"] / "clip.mp4"  # a "folder" that is a file
    with pytest.raises(BadMediaError, match="cannot stat file") as caught:
        decode_clip(path, path, **DECODE)
    assert caught.value.path == str(path)


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads files whatever their permission bits")
def test_permission_denied(tmp_path, synth_dataset):
    path = tmp_path / "locked.mp4"
    shutil.copy(_first_clip(synth_dataset), path)
    path.chmod(0)
    try:
        with pytest.raises(BadMediaError, match="permission denied"):
            decode_clip(path, path, **DECODE)
    finally:
        path.chmod(0o644)


def test_probe_raises_bad_media_error(bad_files):
    with pytest.raises(BadMediaError, match="not a media file"):
        probe_media(bad_files["non_media"])


# ---- features ------------------------------------------------------------------------------


def test_log_mel_shape_for_one_second():
    wave = torch.randn(16000) * 0.1
    assert tuple(log_mel(wave, 16000).shape) == (1, 100, 40)
    assert tuple(log_mel(wave[:8000], 16000).shape) == (1, 50, 40)
    assert tuple(log_mel(wave, 16000, n_mels=64, num_frames=120).shape) == (1, 120, 64)


def test_log_mel_peak_bin_and_floor_by_hand():
    t = torch.arange(16000) / 16000
    tone = 0.5 * torch.sin(2 * math.pi * 1000 * t)
    features = log_mel(tone, 16000)[0]
    # HTK mel: m(f) = 2595 log10(1 + f / 700); 40 triangular filters between 0 and 8000 Hz have
    # centres at the 40 inner points of 42 equally spaced mel points.
    top = 2595 * math.log10(1 + 8000 / 700)
    centres = [700 * (10 ** (top * i / 41 / 2595) - 1) for i in range(1, 41)]
    nearest = min(range(40), key=lambda i: abs(centres[i] - 1000))
    assert int(features.mean(0).argmax()) == nearest
    silence = log_mel(torch.zeros(16000), 16000)
    assert torch.allclose(silence, torch.full_like(silence, math.log(1e-6)))


def test_spectrogram_ogm_matches_a_hand_stft():
    sr, seconds, n_fft, hop = 22050, 3, 512, 353
    rng = np.random.default_rng(0)
    x = rng.normal(0, 0.6, sr * seconds).astype(np.float32)  # some samples beyond [-1, 1]
    got = spectrogram_ogm(torch.from_numpy(x), sr)[0].numpy()
    # OGM-GE CREMA-D: 3 s at 22050 Hz -> 1 + 66150 // 353 = 188 frames of 257 bins
    assert got.shape == (188, 257)
    clipped = np.clip(x, -1, 1)
    padded = np.pad(clipped, (n_fft // 2, n_fft // 2), mode="reflect")
    window = 0.5 - 0.5 * np.cos(2 * np.pi * np.arange(n_fft) / n_fft)  # periodic Hann
    for frame in (0, 1, 100, 187):
        segment = padded[frame * hop : frame * hop + n_fft] * window
        expected = np.log(np.abs(np.fft.rfft(segment)) + 1e-7)
        np.testing.assert_allclose(got[frame], expected, atol=2e-3)


def test_features_reject_bad_input():
    with pytest.raises(ValueError, match="1-D"):
        log_mel(torch.zeros(2, 100), 16000)
    with pytest.raises(ValueError, match="sample_rate_hz"):
        spectrogram_ogm(torch.zeros(1000), 0)


def test_uninformative_no_signature_leaves_the_modality_empty_and_the_card_exact(tmp_path):
    """audio_uninformative / visual_uninformative = "no_signature": a clip that is not informative in a
    modality carries nothing there (a noise-only track, an empty scene), so the modalities complement each
    other: the card's best achievable accuracies are recomputed here by hand from signatures.csv, and the
    media are checked: no object pixels in an empty scene, no chord energy in a noise-only track."""
    classes, per_class = 3, 12
    card = synthesize_dataset(tmp_path, classes=classes, clips_per_class=per_class, clip_seconds=0.5, fps=8,
                              height=32, width=32, audio_informative=0.5, visual_informative=0.5,
                              audio_uninformative="no_signature", visual_uninformative="no_signature", seed=3)
    assert card["params"]["audio_uninformative"] == card["params"]["visual_uninformative"] == "no_signature"
    rows = _rows(tmp_path / "signatures.csv")
    for r in rows:
        for modality in ("audio", "visual"):
            informative = int(r[f"{modality}_informative"])
            assert r[f"{modality}_signature"] == (r["label"] if informative else "none")
    for split in ("train", "val", "test"):
        members = [r for r in rows if r["split"] == split]
        for key, fields in (("audio", ("audio_signature",)), ("visual", ("visual_signature",)),
                            ("audio_visual", ("audio_signature", "visual_signature"))):
            table: dict[tuple, Counter] = {}
            for r in members:
                table.setdefault(tuple(r[f] for f in fields), Counter())[r["label"]] += 1
            best = sum(max(c.values()) for c in table.values()) / len(members)
            assert card["best_achievable_accuracy"][split][key] == pytest.approx(best), (split, key)
    # Complementary: both together do better than either alone (a clip needs only one signature).
    train = card["best_achievable_accuracy"]["train"]
    assert train["audio_visual"] > max(train["audio"], train["visual"]) + 0.15
    # Expected, by hand: p + (1 - p) / K = 0.5 + 0.5 / 3.
    assert card["best_achievable_accuracy_expected"]["audio"] == pytest.approx(0.5 + 0.5 / 3)
    decode = {**DECODE, "clip_seconds": 0.5}
    for r in rows:
        path = tmp_path / r["path"]
        frames, wave = decode_clip(path, path, **decode)
        pixels = frames.reshape(-1, 3).float()
        object_pixels = int(((pixels - 110).abs().max(1).values > 60).sum())
        assert (object_pixels > 20) == bool(int(r["visual_informative"])), (r["clip_id"], object_pixels)
        # The chord (peaks 0.25-0.4, std above 0.08) over noise of std 0.03: a noise-only track is far quieter.
        loud = float(wave.std()) > 0.06
        assert loud == bool(int(r["audio_informative"])), (r["clip_id"], float(wave.std()))
    with pytest.raises(ValueError, match="visual_uninformative"):
        synthesize_dataset(tmp_path / "bad", classes=2, clips_per_class=3, visual_uninformative="nothing")
