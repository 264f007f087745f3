"""Layouts, records, the clip dataset and its decode-once cache, on real encoded clips."""
from __future__ import annotations

import csv
import hashlib
import logging
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pydantic
import pytest
import torch
from torch.utils.data import DataLoader

from workers.cache import ClipCache, DecodeParams, cache_key, decode_entry, encode_entry
from workers.datasets import AVClipDataset, decode_record, load_records
from workers.features import log_mel
from workers.layouts import LAYOUTS, ManifestError
from workers.media import BadMediaError, decode_clip

REPO = Path(__file__).resolve().parents[1]
SMALL = DecodeParams(num_frames=3, frame_height=32, frame_width=32, clip_seconds=1.0)
HALF = DecodeParams(num_frames=3, frame_height=32, frame_width=32, clip_seconds=0.5)


def _manifest_view(root: Path, split: str) -> list[tuple[str, str, str]]:
    """The split as the generator's manifest.csv states it (read here with the csv module)."""
    out = []
    with open(root / "manifest.csv", newline="") as handle:
        for row in csv.DictReader(handle):
            if row["split"] == split:
                audio = row["audio_path"] or row["path"]
                out.append((row["label"], str(root.resolve() / row["path"]), str(root.resolve() / audio)))
    return sorted(out)


# ---- layouts ----------------------------------------------------------------------------------


@pytest.mark.parametrize("layout", LAYOUTS)
def test_every_layout_loads_the_generated_splits(synth_layouts, layout):
    root = synth_layouts[layout]
    seen = set()
    for split in ("train", "val", "test"):
        records, names = load_records(root, layout, split)
        assert records, split
        got = sorted((r.label_name, str(r.video_path), str(r.audio_path)) for r in records)
        assert got == _manifest_view(root, split)
        assert all(names[r.label] == r.label_name and r.split == split for r in records)
        ids = {r.clip_id for r in records}
        assert not ids & seen  # splits are disjoint
        seen |= ids
    assert len(seen) == 12
    ds = AVClipDataset(root, layout, "train", HALF)
    audio, visual, label, index = ds[0]
    assert audio.shape == (1, 50, 40) and audio.dtype == torch.float32
    assert visual.shape == (3, 3, 32, 32) and visual.dtype == torch.float32
    assert label.dtype == torch.int64 and index.dtype == torch.int64 and int(index) == 0


def test_layout_class_orders_follow_the_official_code(synth_layouts):
    _, cremad = load_records(synth_layouts["cremad"], "cremad", "train")
    assert cremad == ["NEU", "HAP", "SAD"]  # CramedDataset.class_dict order (stat.csv present)
    for layout in ("vggsound", "kinetics-sounds", "ave", "avtune"):
        _, names = load_records(synth_layouts[layout], layout, "test")
        assert names == ["class_00", "class_01", "class_02"], layout


def test_derived_validation_split_by_hand(synth_layouts):
    root = synth_layouts["cremad"]
    official_train = [line.split(",") for line in (root / "train.csv").read_text().splitlines()]
    by_class: dict[str, list[str]] = {}
    for clip, label in official_train:
        by_class.setdefault(label, []).append(clip)
    expected_val = set()
    for clips in by_class.values():
        # 3 clips per class: round(0.15 * 3) = 0, raised to the minimum of one
        ordered = sorted(clips, key=lambda c: hashlib.sha1(c.encode()).hexdigest())
        expected_val.add(ordered[0])
    val, _ = load_records(root, "cremad", "val")
    train, _ = load_records(root, "cremad", "train")
    test, _ = load_records(root, "cremad", "test")
    assert {r.clip_id for r in val} == expected_val
    assert {r.clip_id for r in val} | {r.clip_id for r in train} == {c for c, _ in official_train}
    test_ids = {line.split(",")[0] for line in (root / "test.csv").read_text().splitlines()}
    assert {r.clip_id for r in test} == test_ids and not test_ids & expected_val


def test_vggsound_uses_the_extracted_wav_and_falls_back_to_the_mp4(tmp_path, synth_layouts):
    root = tmp_path / "vgg"
    shutil.copytree(synth_layouts["vggsound"], root)
    records, _ = load_records(root, "vggsound", "test")
    assert all(r.audio_path.suffix == ".wav" and "test-audios/test-set" in str(r.audio_path) for r in records)
    shutil.rmtree(root / "test-audios")
    records, _ = load_records(root, "vggsound", "test")
    assert all(r.audio_path == r.video_path for r in records)
    frames, wave = decode_record(records[0], HALF)
    assert wave.shape == (1, 50, 40)


def test_ave_repeated_video_keeps_its_last_label(tmp_path, synth_layouts):
    root = tmp_path / "ave"
    shutil.copytree(synth_layouts["ave"], root)
    rows = (root / "trainSet.txt").read_text().splitlines()
    first = rows[0].split("&")
    other = "class_02" if first[0] != "class_02" else "class_01"
    (root / "trainSet.txt").write_text("\n".join(rows + [f"{other}&{first[1]}&good&0&1"]) + "\n")
    records, names = load_records(root, "ave", "train")
    same = [r for r in records if r.clip_id == first[1]]
    assert len(same) == 1 and same[0].label_name == other
    assert records[-1].clip_id == first[1]  # OGM-GE removes the earlier entry and appends the new one
    assert len(records) == len(rows)


def test_kinetics_sounds_accepts_both_row_formats(tmp_path, synth_layouts):
    root = tmp_path / "ks"
    shutil.copytree(synth_layouts["kinetics-sounds"], root)
    index_rows = (root / "my_test.txt").read_text().splitlines()
    names = sorted((root / "stat.txt").read_text().split())
    # AVDataset's own format: "class,clip_id"
    (root / "my_test.txt").write_text("".join(f"{names[int(r.split(',')[2])]},{r.split(',')[0]}\n" for r in index_rows))
    a, _ = load_records(synth_layouts["kinetics-sounds"], "kinetics-sounds", "test")
    b, _ = load_records(root, "kinetics-sounds", "test")
    assert [(r.clip_id, r.label) for r in a] == [(r.clip_id, r.label) for r in b]


# ---- manifest errors ----------------------------------------------------------------------------


def _custom_root(tmp_path: Path, synth_dataset: Path, rows: list[list[str]]) -> Path:
    """An avtune root with two good clips copied from the fixture plus the given extra rows."""
    root = tmp_path / "root"
    (root / "clips").mkdir(parents=True)
    for i, source in enumerate(sorted(synth_dataset.glob("clips/class_0[01]/*_0000.mp4"))):
        shutil.copy(source, root / "clips" / f"good{i}.mp4")
    (root / "classes.txt").write_text("class_00\nclass_01\n")
    lines = [
        ["path", "label", "split"],
        ["clips/good0.mp4", "class_00", "train"],
        ["clips/good1.mp4", "class_01", "train"],
    ]
    with open(root / "manifest.csv", "w", newline="") as handle:
        csv.writer(handle).writerows(lines + rows)
    return root


@pytest.mark.parametrize(
    "kind,problem",
    [
        ("dotdot", "contains '..'"),
        ("absolute", "outside the dataset root"),
        ("symlink", "is a symlink that resolves outside the dataset root"),
        ("loop", "cannot be resolved: Symlink loop"),
        ("label", "unknown label 'class_07'"),
    ],
)
def test_manifest_rows_outside_the_root_or_with_unknown_labels(tmp_path, synth_dataset, kind, problem):
    outside = tmp_path / "outside.mp4"
    shutil.copy(next(synth_dataset.glob("clips/class_00/*.mp4")), outside)
    row = {
        "dotdot": ["../outside.mp4", "class_00", "train"],
        "absolute": [str(outside), "class_00", "train"],
        "symlink": ["clips/link.mp4", "class_00", "train"],
        "loop": ["clips/loop.mp4", "class_00", "train"],
        "label": ["clips/good0.mp4", "class_07", "train"],
    }[kind]
    root = _custom_root(tmp_path, synth_dataset, [row])
    (root / "clips" / "link.mp4").symlink_to(outside)
    (root / "clips" / "loop.mp4").symlink_to(root / "clips" / "loop.mp4")  # a link to itself: ELOOP
    manifest = root / "manifest.csv"
    with pytest.raises(ManifestError) as caught:
        load_records(root, "avtune", "train")
    err = caught.value
    assert err.path == str(manifest.resolve()) and err.line == 4
    assert problem in err.problem
    assert str(err).startswith(f"{manifest.resolve()}, line 4: ")
    with pytest.raises(ManifestError):
        AVClipDataset(root, "avtune", "train", SMALL)
    ds = AVClipDataset(root, "avtune", "train", SMALL, on_bad_media="skip")
    assert len(ds) == 2 and len(ds.skipped) == 1
    assert ds.skipped[0][0] == f"{manifest.resolve()}, line 4" and problem in ds.skipped[0][1]


def test_symlink_inside_the_root_is_allowed(tmp_path, synth_dataset):
    root = _custom_root(tmp_path, synth_dataset, [["clips/alias.mp4", "class_01", "val"]])
    (root / "clips" / "alias.mp4").symlink_to(root / "clips" / "good1.mp4")
    records, _ = load_records(root, "avtune", "val")
    assert len(records) == 1 and records[0].video_path.name == "alias.mp4"


def test_unknown_label_in_an_official_list_names_file_and_line(tmp_path, synth_layouts):
    root = tmp_path / "cremad"
    shutil.copytree(synth_layouts["cremad"], root)
    with open(root / "test.csv", "a") as handle:
        handle.write("1099_IEO_XYZ_XX,XYZ\n")
    lines = (root / "test.csv").read_text().splitlines()
    with pytest.raises(ManifestError, match=rf"test\.csv, line {len(lines)}: unknown label 'XYZ'"):
        load_records(root, "cremad", "test")


def test_missing_split_list_is_reported(tmp_path):
    with pytest.raises(ManifestError, match="manifest.csv: manifest not found"):
        load_records(tmp_path, "avtune", "train")
    with pytest.raises(ValueError, match="layout must be one of"):
        load_records(tmp_path, "kinetics", "train")


# ---- bad media in the dataset ---------------------------------------------------------------------


def test_bad_media_error_and_skip_modes(tmp_path, synth_dataset, synth_layouts, caplog):
    good = next(synth_dataset.glob("clips/class_00/*.mp4")).read_bytes()
    rows = [
        ["clips/truncated.mp4", "class_00", "train"],
        ["clips/text.mp4", "class_00", "train"],
        ["clips/empty.mp4", "class_01", "train"],
        ["clips/missing.mp4", "class_01", "train"],
        ["clips/silent.flv", "class_01", "train"],  # video only
        ["clips/good0.mp4", "class_00", "train", "clips/sound.flv"],  # "audio" file has no audio
        ["../escape.mp4", "class_00", "train"],
    ]
    root = _custom_root(tmp_path, synth_dataset, [])
    with open(root / "manifest.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["path", "label", "split", "audio_path"])
        writer.writerow(["clips/good0.mp4", "class_00", "train", ""])
        writer.writerow(["clips/good1.mp4", "class_01", "train", ""])
        writer.writerows(rows)
    (root / "clips" / "truncated.mp4").write_bytes(good[: len(good) // 2])
    (root / "clips" / "text.mp4").write_text("not a video\n" * 10)
    (root / "clips" / "empty.mp4").touch()
    silent = sorted((synth_layouts["cremad"] / "VideoFlash").glob("*.flv"))[0]
    shutil.copy(silent, root / "clips" / "silent.flv")
    shutil.copy(silent, root / "clips" / "sound.flv")

    with pytest.raises(ManifestError, match=r"manifest\.csv, line 10: .*'\.\.'"):
        AVClipDataset(root, "avtune", "train", SMALL)
    with caplog.at_level(logging.WARNING, logger="workers.datasets"):
        ds = AVClipDataset(root, "avtune", "train", SMALL, on_bad_media="skip", cache_dir=tmp_path / "cache")
    assert len(ds) == 2 and ds.labels.tolist() == [0, 1]
    reasons = dict(ds.skipped)
    assert len(ds.skipped) == 7
    clips = root.resolve() / "clips"
    assert "truncated MP4 file" in reasons[str(clips / "truncated.mp4")]
    assert "not a media file" in reasons[str(clips / "text.mp4")]
    assert reasons[str(clips / "empty.mp4")] == "file is empty (0 bytes)"
    assert reasons[str(clips / "missing.mp4")] == "file not found"
    assert reasons[str(clips / "silent.flv")] == "no audio stream"
    assert reasons[str(clips / "sound.flv")] == "no audio stream"
    assert "skipped 7 bad clip(s)" in caplog.text
    # only the good clips were cached
    assert len(list((tmp_path / "cache").rglob("*.avc"))) == 2

    # "error" mode: construction succeeds once the escaping row is gone, the bad file raises on access
    lines = (root / "manifest.csv").read_text().splitlines()
    (root / "manifest.csv").write_text("\n".join(lines[:-1]) + "\n")
    ds = AVClipDataset(root, "avtune", "train", SMALL)
    assert len(ds) == 8
    ds[0]
    with pytest.raises(BadMediaError) as caught:
        ds[2]
    assert caught.value.path == str(clips / "truncated.mp4")
    assert str(caught.value).startswith(str(clips / "truncated.mp4") + ": truncated")


# ---- the dataset item -------------------------------------------------------------------------------


def test_item_is_normalised_frames_and_log_mel_by_hand(synth_dataset):
    ds = AVClipDataset(synth_dataset, "avtune", "val", SMALL)
    assert ds.num_classes == 3 and ds.class_names == ["class_00", "class_01", "class_02"]
    assert len(ds) == 3 and ds.labels.dtype == torch.int64
    for i in range(len(ds)):
        audio, visual, label, index = ds[i]
        record = ds.records[i]
        frames, wave = decode_clip(record.video_path, record.audio_path, num_frames=3, frame_height=32,
                                   frame_width=32, sample_rate_hz=16000, clip_seconds=1.0)
        mean = torch.tensor([0.485, 0.456, 0.406])
        std = torch.tensor([0.229, 0.224, 0.225])
        expected = ((frames.float() / 255 - mean) / std).permute(3, 0, 1, 2)  # (3, T, H, W)
        torch.testing.assert_close(visual, expected)
        torch.testing.assert_close(audio, log_mel(wave, 16000, n_mels=40, win_ms=25, hop_ms=10))
        assert int(label) == ds.labels[i] == record.label and int(index) == i


def test_spectrogram_feature_shape():
    params = DecodeParams(audio_feature="spectrogram", sample_rate_hz=22050, win_ms=23.22, hop_ms=16.01,
                          clip_seconds=3.0)
    from workers.cache import audio_feature_shape

    # OGM-GE CREMA-D: n_fft 512 -> 257 bins; 1 + 66150 // 353 = 188 frames
    assert audio_feature_shape(params) == (1, 188, 257)


def test_spectrogram_items(synth_dataset):
    params = DecodeParams(audio_feature="spectrogram", win_ms=16.0, hop_ms=8.0, frame_height=32, frame_width=32)
    audio, _, _, _ = AVClipDataset(synth_dataset, "avtune", "test", params)[0]
    # 16 kHz, n_fft 256, hop 128 (OGM-GE VGGSound setting): 1 + 16000 // 128 = 126 frames of 129 bins
    assert audio.shape == (1, 126, 129)


def test_dataloader_batches_with_worker_processes(synth_dataset, tmp_path):
    ds = AVClipDataset(synth_dataset, "avtune", "train", SMALL, cache_dir=tmp_path / "cache")
    loader = DataLoader(ds, batch_size=4, num_workers=2, shuffle=False)
    seen = []
    for audio, visual, label, index in loader:
        assert audio.shape[1:] == (1, 100, 40) and visual.shape[1:] == (3, 3, 32, 32)
        assert torch.equal(label, ds.labels[index])
        seen += index.tolist()
    assert seen == list(range(len(ds)))
    assert len(list((tmp_path / "cache").rglob("*.avc"))) == len(ds)


def test_decode_params_validation_names_the_field():
    with pytest.raises(pydantic.ValidationError, match="num_frames"):
        DecodeParams(num_frames=0)
    with pytest.raises(pydantic.ValidationError, match="hop_ms"):
        DecodeParams(hop_ms=-1)
    with pytest.raises(pydantic.ValidationError, match="normalize_std"):
        DecodeParams(normalize_std=(0.2, 0.0, 0.2))
    with pytest.raises(pydantic.ValidationError, match="frame_rate"):
        DecodeParams(frame_rate=3)  # unknown field
    with pytest.raises(pydantic.ValidationError, match="audio_feature"):
        DecodeParams(audio_feature="mfcc")
    params = DecodeParams()
    with pytest.raises(pydantic.ValidationError):
        params.num_frames = 8  # frozen
    assert DecodeParams(**params.model_dump()) == params
    assert cache_key(params) == cache_key(DecodeParams()) != cache_key(DecodeParams(num_frames=8))


def test_dataset_arguments_are_checked(synth_dataset):
    with pytest.raises(ValueError, match="on_bad_media"):
        AVClipDataset(synth_dataset, "avtune", "train", SMALL, on_bad_media="ignore")
    with pytest.raises(ValueError, match="split must be one of"):
        AVClipDataset(synth_dataset, "avtune", "validation", SMALL)
    with pytest.raises(ValueError, match="prefetch needs a cache"):
        AVClipDataset(synth_dataset, "avtune", "val", SMALL).prefetch()


def test_class_names_argument_fixes_the_label_order(synth_dataset):
    ds = AVClipDataset(synth_dataset, "avtune", "val", SMALL, class_names=["class_02", "class_01", "class_00"])
    assert [ds.class_names[int(label)] for label in ds.labels] == [r.label_name for r in ds.records]
    assert ds.records[0].label == 2 - int(ds.records[0].label_name[-1])
    with pytest.raises(ManifestError, match="unknown label"):
        AVClipDataset(synth_dataset, "avtune", "val", SMALL, class_names=["class_00"])


# ---- cache ----------------------------------------------------------------------------------------


def _entries(cache: Path) -> list[Path]:
    return sorted(cache.rglob("*.avc"))


def test_cache_hit_serves_the_stored_tensors(synth_dataset, tmp_path):
    cache = tmp_path / "cache"
    ds = AVClipDataset(synth_dataset, "avtune", "val", SMALL, cache_dir=cache)
    assert ds.prefetch() == 3
    assert ds.prefetch() == 0  # all hits now
    first = ds[0]
    clip_cache = ClipCache(cache, SMALL)
    entry = clip_cache.entry_path(clip_cache.key(ds.records[0].video_path, ds.records[0].audio_path))
    assert entry.is_file()
    key, stored = decode_entry(bytearray(entry.read_bytes()))
    # replace the entry by a valid one of constant values: a hit must return exactly that
    entry.write_bytes(encode_entry(key, {"frames": torch.full_like(stored["frames"], 255),
                                         "audio": torch.full_like(stored["audio"], 7.0)}))
    audio, visual, _, _ = ds[0]
    assert torch.all(audio == 7.0)
    torch.testing.assert_close(visual[0], torch.full_like(visual[0], (1 - 0.485) / 0.229))
    assert not torch.equal(audio, first[0])


def test_changed_params_or_file_make_new_entries(synth_dataset, tmp_path):
    cache = tmp_path / "cache"
    root = tmp_path / "data"
    shutil.copytree(synth_dataset, root)
    AVClipDataset(root, "avtune", "val", SMALL, cache_dir=cache).prefetch()
    assert len(_entries(cache)) == 3
    other = DecodeParams(num_frames=2, frame_height=32, frame_width=32)
    assert AVClipDataset(root, "avtune", "val", other, cache_dir=cache).prefetch() == 3
    assert len(_entries(cache)) == 6 and len([p for p in cache.iterdir() if p.is_dir()]) == 2
    # touching a source file changes its identity (mtime): a new entry, the old one is not used
    ds = AVClipDataset(root, "avtune", "val", SMALL, cache_dir=cache)
    st = ds.records[0].video_path.stat()
    os.utime(ds.records[0].video_path, ns=(st.st_atime_ns, st.st_mtime_ns + 10_000_000))
    assert ds.prefetch() == 1
    assert len(_entries(cache)) == 7


@pytest.mark.parametrize("damage", ["truncated", "garbage", "bit_flip", "wrong_shape", "other_clip"])
def test_corrupt_entry_is_deleted_and_rebuilt(synth_dataset, tmp_path, caplog, damage):
    cache = tmp_path / "cache"
    ds = AVClipDataset(synth_dataset, "avtune", "val", SMALL, cache_dir=cache)
    reference = ds[1]
    clip_cache = ClipCache(cache, SMALL)
    record = ds.records[1]
    entry = clip_cache.entry_path(clip_cache.key(record.video_path, record.audio_path))
    data = entry.read_bytes()
    if damage == "truncated":
        entry.write_bytes(data[: len(data) // 2])
    elif damage == "garbage":
        entry.write_bytes(os.urandom(len(data)))
    elif damage == "bit_flip":
        flipped = bytearray(data)
        flipped[-100] ^= 0x01  # inside the audio payload
        entry.write_bytes(bytes(flipped))
    elif damage == "wrong_shape":
        key, stored = decode_entry(bytearray(data))
        entry.write_bytes(encode_entry(key, {**stored, "frames": stored["frames"][:1].clone()}))
    else:
        _, stored = decode_entry(bytearray(data))
        entry.write_bytes(encode_entry("0" * 64, stored))
    with caplog.at_level(logging.WARNING, logger="workers.cache"):
        rebuilt = ds[1]
    assert "deleting and rebuilding" in caplog.text and str(entry) in caplog.text
    for a, b in zip(rebuilt, reference):
        torch.testing.assert_close(a, b)
    assert decode_entry(bytearray(entry.read_bytes()))[1]["frames"].shape == (3, 32, 32, 3)


def test_two_processes_fill_the_same_cache(synth_dataset, tmp_path):
    cache = tmp_path / "cache"
    script = textwrap.dedent(
        f"""
        import sys
        from workers.datasets import AVClipDataset, DecodeParams
        params = DecodeParams(num_frames=3, frame_height=32, frame_width=32)
        ds = AVClipDataset({str(synth_dataset)!r}, "avtune", "train", params, cache_dir={str(cache)!r})
        order = range(len(ds)) if sys.argv[1] == "forward" else reversed(range(len(ds)))
        for _ in range(2):
            for i in order:
                ds[i]
        """
    )
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    procs = [
        subprocess.Popen([sys.executable, "-c", script, direction], cwd=REPO, env=env,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for direction in ("forward", "backward")
    ]
    for proc in procs:
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err
    ds = AVClipDataset(synth_dataset, "avtune", "train", SMALL, cache_dir=cache)
    entries = _entries(cache)
    assert len(entries) == len(ds) == 18
    assert not [p for p in cache.rglob("*") if p.name.endswith(".tmp")]
    clip_cache = ClipCache(cache, SMALL)
    for record in ds.records:
        loaded = clip_cache.load(clip_cache.key(record.video_path, record.audio_path))
        assert loaded is not None
        frames, audio = decode_record(record, SMALL)
        assert torch.equal(loaded["frames"], frames)
        torch.testing.assert_close(loaded["audio"], audio)
