"""On-disk dataset layouts: where the media files and the split lists live, for each dataset.

The generator (:mod:`orchestrator.synth`) writes these layouts and the loader (:mod:`workers.datasets`)
reads them, so both sides share the definitions here. Each reader returns :class:`ManifestRow`
entries with paths *relative to the dataset root*; confinement to the root, label checks and file
checks happen in :func:`workers.datasets.load_records`.

Layouts (the split lists follow the official OGM-GE code, ``GeWu-Lab/OGM-GE_CVPR2022``; media
files are the raw videos / wavs, decoded with PyAV instead of OGM-GE's pre-extracted frames):

``avtune``
    ``manifest.csv`` with columns ``path,label,split`` and optionally ``audio_path`` (when audio
    lives in a separate file); ``classes.txt`` (one class per line, line order = label index;
    without it the sorted labels of the whole manifest).
``cremad``
    ``AudioWAV/<clip>.wav`` + ``VideoFlash/<clip>.flv`` (separate files, as CREMA-D ships them);
    ``train.csv`` / ``test.csv`` rows ``clip_id,EMOTION`` (``data/CREMAD/*.csv``); class order
    from ``stat.csv`` if present, else ``NEU, HAP, SAD, FEA, DIS, ANG``
    (``dataset/CramedDataset.py``, ``class_dict``).
``vggsound``
    ``vggsound.csv`` rows ``youtube_id,start_seconds,label,split`` (split ``train``/``test``);
    ``{train,test}-videos/{train,test}-set/<id>_<start>.mp4``; audio from
    ``{train,test}-audios/{train,test}-set/<id>_<start>.wav`` when present (the output of
    ``data/VGGSound/mp4_to_wav.py``), otherwise from the mp4. Class order = order of first
    appearance among the train rows (``dataset/VGGSoundDataset.py``).
``kinetics-sounds``
    ``stat.txt`` (class names, one per line; label index = position in the *sorted* list, as
    ``dataset/dataset.py`` ``AVDataset`` sorts them); ``my_train.txt`` / ``my_test.txt`` rows
    either ``clip_id,seconds,label_index`` (the lists shipped in ``data/KineticSound/``) or
    ``class_name,clip_id`` (what ``AVDataset`` reads); ``videos/<clip_id>.mp4``; audio from
    ``audio/<clip_id>.wav`` when present, otherwise from the mp4.
``ave``
    ``AVE/<video_id>.mp4``; ``Annotations.txt`` (header ``Category&VideoID&Quality&StartTime&EndTime``)
    and ``trainSet.txt`` / ``valSet.txt`` / ``testSet.txt`` with the same ``&``-separated fields.
    Class order = sorted categories of ``Annotations.txt``. A video listed twice in one split
    keeps its last label (``dataset/dataset.py``: "AVE, delete repeated labels").

Validation split: ``cremad``, ``vggsound`` and ``kinetics-sounds`` have only train and test
lists. Their ``val`` split is derived from the official train list, per class: the clips are
ordered by the SHA-1 of their clip id and the first ``round(val_fraction * n_class)`` (at least
one when the class has two or more clips, never all of them) form ``val``; the rest stay in
``train``. The rule is deterministic, needs no seed, and never touches the test list, so model
selection never sees test clips.
"""

from __future__ import annotations

import csv
import hashlib
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

__all__ = [
    "LAYOUTS",
    "SPLITS",
    "CREMAD_EMOTIONS",
    "DERIVED_VAL_FRACTION",
    "LAYOUTS_WITH_DERIVED_VAL",
    "ManifestError",
    "ManifestRow",
    "round_half_up",
    "derive_validation",
    "read_layout",
]

LAYOUTS = ("avtune", "cremad", "vggsound", "kinetics-sounds", "ave")
SPLITS = ("train", "val", "test")
# OGM-GE_CVPR2022/dataset/CramedDataset.py: class_dict = {'NEU':0, 'HAP':1, 'SAD':2, 'FEA':3, 'DIS':4, 'ANG':5}
CREMAD_EMOTIONS = ("NEU", "HAP", "SAD", "FEA", "DIS", "ANG")
LAYOUTS_WITH_DERIVED_VAL = ("cremad", "vggsound", "kinetics-sounds")
# Share of each class of an official train list that becomes the validation split.
DERIVED_VAL_FRACTION = 0.15
AVE_HEADER = "Category&VideoID&Quality&StartTime&EndTime"


class ManifestError(ValueError):
    """A bad row in a split list / manifest: names the file, the line and the problem."""

    def __init__(self, path: str | Path, line: int | None, problem: str) -> None:
        self.path = str(path)
        self.line = line
        self.problem = problem
        where = f"{self.path}, line {line}" if line is not None else self.path
        super().__init__(f"{where}: {problem}")

    def __reduce__(self):  # picklable across processes
        return (type(self), (self.path, self.line, self.problem))


@dataclass(frozen=True)
class ManifestRow:
    """One clip as a split list names it; paths are relative to the dataset root.

    ``problem`` is set (and the other fields may be empty) for a row that cannot be used, so the
    loader can raise or skip it like any other bad row.
    """

    manifest: Path
    line: int
    clip_id: str
    video: str
    audio: str
    label: str
    split: str
    problem: str | None = None


def _bad_row(manifest: Path, line: int, split: str, problem: str) -> ManifestRow:
    return ManifestRow(manifest, line, "", "", "", "", split, problem)


def round_half_up(value: float) -> int:
    """Round to the nearest integer, halves up (Python's ``round`` rounds halves to even)."""
    return int(math.floor(value + 0.5 + 1e-9))


def _sha1(text: str) -> str:
    return hashlib.sha1(text.encode("utf-8")).hexdigest()


def derive_validation(clips: Iterable[tuple[str, str]], val_fraction: float) -> set[str]:
    """Clip ids moved from an official train list to ``val``; ``clips`` = ``(clip_id, label)``.

    Per class: order by SHA-1 of the clip id, take the first
    ``round_half_up(val_fraction * n)`` clips, at least 1 when ``n >= 2`` and at most ``n - 1``.
    """
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    by_class: dict[str, list[str]] = {}
    for clip_id, label in clips:
        by_class.setdefault(label, []).append(clip_id)
    chosen: set[str] = set()
    for ids in by_class.values():
        n = len(ids)
        count = round_half_up(val_fraction * n)
        if val_fraction > 0 and n >= 2:
            count = min(max(count, 1), n - 1)
        chosen.update(sorted(ids, key=_sha1)[:count])
    return chosen


# ---- readers --------------------------------------------------------------------------------


def _read_rows(path: Path, *, delimiter: str = ",", encoding: str = "utf-8-sig") -> list[tuple[int, list[str]]]:
    """Non-empty csv rows with their 1-based line numbers (a UTF-8 BOM is ignored)."""
    if not path.is_file():
        raise ManifestError(path, None, "split list not found")
    try:
        text = path.read_text(encoding=encoding)
    except (OSError, UnicodeDecodeError) as err:
        raise ManifestError(path, None, f"cannot read split list ({err})") from None
    rows = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        fields = next(csv.reader([line], delimiter=delimiter))
        rows.append((number, [field.strip() for field in fields]))
    return rows


def _read_class_list(path: Path) -> list[str]:
    names = [fields[0] for _, fields in _read_rows(path) if fields and fields[0]]
    if not names:
        raise ManifestError(path, None, "class list is empty")
    return names


def _split_train_val(
    rows: list[ManifestRow], split: str, val_fraction: float
) -> list[ManifestRow]:
    """Rows of the official train list that belong to ``split`` ('train' or 'val')."""
    usable = [r for r in rows if r.problem is None]
    val_ids = derive_validation(((r.clip_id, r.label) for r in usable), val_fraction)
    keep_val = split == "val"
    out = [
        ManifestRow(r.manifest, r.line, r.clip_id, r.video, r.audio, r.label, split)
        for r in usable
        if (r.clip_id in val_ids) == keep_val
    ]
    # Unusable rows are reported with the train split (they cannot be placed in either).
    return out + [r for r in rows if r.problem is not None and split == "train"]


def _audio_if_present(root: Path, wav: str, fallback: str) -> str:
    return wav if (root / wav).exists() else fallback


def _read_avtune(root: Path, split: str) -> tuple[list[ManifestRow], list[str]]:
    manifest = root / "manifest.csv"
    if not manifest.is_file():
        raise ManifestError(manifest, None, "manifest not found")
    with open(manifest, newline="", encoding="utf-8-sig") as handle:
        reader = csv.DictReader(handle)
        missing = {"path", "label", "split"} - set(reader.fieldnames or [])
        if missing:
            raise ManifestError(manifest, 1, f"missing column(s) {sorted(missing)}")
        all_rows = [(reader.line_num, row) for row in reader]
    out: list[ManifestRow] = []
    labels: set[str] = set()
    for line, row in all_rows:
        row_split = (row.get("split") or "").strip()
        if row_split not in SPLITS:
            raise ManifestError(manifest, line, f"split must be one of {SPLITS}, got {row_split!r}")
        label = (row.get("label") or "").strip()
        labels.add(label)
        if row_split != split:
            continue
        video = (row.get("path") or "").strip()
        audio = (row.get("audio_path") or "").strip() or video
        out.append(ManifestRow(manifest, line, Path(video).stem, video, audio, label, split))
    classes_file = root / "classes.txt"
    class_names = _read_class_list(classes_file) if classes_file.exists() else sorted(labels)
    return out, class_names


def _read_cremad(root: Path, split: str, val_fraction: float) -> tuple[list[ManifestRow], list[str]]:
    # OGM-GE_CVPR2022/dataset/CramedDataset.py: train.csv / test.csv rows "clip,EMOTION"; audio
    # AudioWAV/<clip>.wav; video from VideoFlash/<clip>.flv (data/CREMAD/video_preprocessing.py).
    stat = root / "stat.csv"
    class_names = _read_class_list(stat) if stat.exists() else list(CREMAD_EMOTIONS)
    manifest = root / ("test.csv" if split == "test" else "train.csv")
    rows = []
    for line, fields in _read_rows(manifest):
        if len(fields) < 2:
            rows.append(_bad_row(manifest, line, split, "expected 'clip_id,EMOTION'"))
            continue
        clip = fields[0]
        rows.append(
            ManifestRow(
                manifest, line, clip, f"VideoFlash/{clip}.flv", f"AudioWAV/{clip}.wav", fields[1], split
            )
        )
    if split != "test":
        rows = _split_train_val(rows, split, val_fraction)
    return rows, class_names


def _read_vggsound(root: Path, split: str, val_fraction: float) -> tuple[list[ManifestRow], list[str]]:
    # OGM-GE_CVPR2022/dataset/VGGSoundDataset.py: vggsound.csv rows (id, start, label, split);
    # files named id + '_' + start; classes in order of first appearance among train rows.
    manifest = root / "vggsound.csv"
    wanted = "test" if split == "test" else "train"
    rows: list[ManifestRow] = []
    class_names: list[str] = []
    for line, fields in _read_rows(manifest, encoding="utf-8"):
        if len(fields) < 4:
            raise ManifestError(manifest, line, "expected 'youtube_id,start_seconds,label,split'")
        ytid, start, label, row_split = fields[:4]
        if row_split not in ("train", "test"):
            raise ManifestError(manifest, line, f"split must be 'train' or 'test', got {row_split!r}")
        if row_split == "train" and label not in class_names:
            class_names.append(label)
        if row_split != wanted:
            continue
        clip = f"{ytid}_{start}"
        video = f"{row_split}-videos/{row_split}-set/{clip}.mp4"
        wav = f"{row_split}-audios/{row_split}-set/{clip}.wav"
        rows.append(ManifestRow(manifest, line, clip, video, _audio_if_present(root, wav, video), label, split))
    if split != "test":
        rows = _split_train_val(rows, split, val_fraction)
    return rows, class_names


def _read_kinetics_sounds(
    root: Path, split: str, val_fraction: float
) -> tuple[list[ManifestRow], list[str]]:
    # OGM-GE_CVPR2022/dataset/dataset.py (AVDataset): classes = sorted(stat.txt rows); split lists
    # my_train.txt / my_test.txt. Rows "clip_id,seconds,label_index" as in data/KineticSound/*.txt,
    # or "class_name,clip_id" as AVDataset parses them.
    class_names = sorted(_read_class_list(root / "stat.txt"))
    manifest = root / ("my_test.txt" if split == "test" else "my_train.txt")
    rows: list[ManifestRow] = []
    for line, fields in _read_rows(manifest):
        if len(fields) >= 3:
            clip, label_field = fields[0], fields[2]
            try:
                index = int(label_field)
            except ValueError:
                rows.append(_bad_row(manifest, line, split, f"label index {label_field!r} is not an integer"))
                continue
            if not 0 <= index < len(class_names):
                rows.append(_bad_row(
                    manifest, line, split,
                    f"unknown label index {index} (stat.txt lists {len(class_names)} classes)",
                ))
                continue
            label = class_names[index]
        elif len(fields) == 2:
            label, clip = fields
        else:
            rows.append(_bad_row(manifest, line, split, "expected 'clip_id,seconds,label_index' or 'class,clip_id'"))
            continue
        video = f"videos/{clip}.mp4"
        audio = _audio_if_present(root, f"audio/{clip}.wav", video)
        rows.append(ManifestRow(manifest, line, clip, video, audio, label, split))
    if split != "test":
        rows = _split_train_val(rows, split, val_fraction)
    return rows, class_names


def _read_ave_list(path: Path, split: str) -> list[ManifestRow]:
    rows: dict[str, ManifestRow] = {}
    for line, fields in _read_rows(path, delimiter="&"):
        if "&".join(fields) == AVE_HEADER:
            continue
        if len(fields) != 5:
            rows[f"#line{line}"] = _bad_row(path, line, split, f"expected 5 '&'-separated fields ({AVE_HEADER})")
            continue
        category, video_id = fields[0], fields[1]
        # OGM-GE dataset/dataset.py: "AVE, delete repeated labels" -- a repeated video keeps the
        # label of its last row.
        rows.pop(video_id, None)
        video = f"AVE/{video_id}.mp4"
        rows[video_id] = ManifestRow(path, line, video_id, video, video, category, split)
    return list(rows.values())


def _read_ave(root: Path, split: str) -> tuple[list[ManifestRow], list[str]]:
    annotations = root / "Annotations.txt"
    categories = {row.label for row in _read_ave_list(annotations, "all") if row.problem is None}
    if not categories:
        raise ManifestError(annotations, None, "no annotations")
    list_name = {"train": "trainSet.txt", "val": "valSet.txt", "test": "testSet.txt"}[split]
    return _read_ave_list(root / list_name, split), sorted(categories)


def read_layout(
    root: Path, layout: str, split: str, *, val_fraction: float = DERIVED_VAL_FRACTION
) -> tuple[list[ManifestRow], list[str]]:
    """Rows of ``split`` and the dataset's class list (index = label) for ``layout``."""
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if layout == "avtune":
        return _read_avtune(root, split)
    if layout == "cremad":
        return _read_cremad(root, split, val_fraction)
    if layout == "vggsound":
        return _read_vggsound(root, split, val_fraction)
    if layout == "kinetics-sounds":
        return _read_kinetics_sounds(root, split, val_fraction)
    return _read_ave(root, split)
