"""Folders avtune writes into (generated clips, reports): claimed with a marker file, never through a
symbolic link.

A folder is avtune's to write into when it is new, empty, or holds avtune's marker as a regular file. A
symlink is never followed: not the folder itself, not the marker (a planted `.avtune-generated ->
~/victim.txt` would have the marker's text written over the victim and the user's folder claimed), not a
sub-folder on the way to a file (a planted `clips -> ~/elsewhere` would have clips written there).
"""
from __future__ import annotations

import json
import os
import re
import stat
from pathlib import Path
from typing import Callable


def is_regular_file(path: Path) -> bool:
    """A regular file itself, not a symlink to one."""
    try:
        return stat.S_ISREG(os.lstat(path).st_mode)
    except OSError:
        return False


def holds_marker(root: Path, marker: str) -> bool:
    return is_regular_file(Path(root) / marker)


def claim_folder(root: Path, marker: str, what: str, refusal: str,
                 legacy: Callable[[Path], bool] | None = None) -> None:
    """Make `root` avtune's (create it, write `marker` in it) or raise FileExistsError starting with `what`
    (the option or field that named the folder): it must not be a symlink or a file, and when it is not
    empty it must hold the marker (or pass `legacy`, a folder made before markers existed). `refusal` ends
    the message for a non-empty foreign folder (what to do instead)."""
    root = Path(root)
    if root.is_symlink():
        raise FileExistsError(f"{what}: {root} is a symbolic link; give the folder it points to, {root.resolve()}, "
                              "if that is meant (avtune never writes through a link)")
    if root.exists() and not root.is_dir():
        raise FileExistsError(f"{what}: {root} is a file, not a folder avtune can write into")
    if root.is_dir() and any(root.iterdir()) and not holds_marker(root, marker) and not (legacy and legacy(root)):
        raise FileExistsError(f"{what}: {root} is not empty and was not made by {refusal}")
    if root.is_dir() and (link := first_symlink(root)) is not None:
        raise FileExistsError(f"{what}: {link} is a symbolic link inside {root}: avtune does not write through it "
                              "(remove the link, or give a new folder)")
    root.mkdir(parents=True, exist_ok=True)
    check_inside(root, root / marker)
    write_marker(root / marker)


def first_symlink(root: Path) -> Path | None:
    """A symlink anywhere under `root` (not followed), or None."""
    for folder, dirs, files in os.walk(root):  # followlinks=False: a linked folder is listed, not entered
        for name in dirs + files:
            if (Path(folder) / name).is_symlink():
                return Path(folder) / name
    return None


def write_marker(path: Path) -> None:
    """The marker file, replaced atomically: a symlink planted under its name is replaced, never written through."""
    partial = path.with_name(path.name + ".partial")
    fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o644)
    with os.fdopen(fd, "w") as handle:
        handle.write("made by avtune; avtune may rewrite the files it made here\n")
    os.replace(partial, path)


def check_inside(root: Path, path: Path) -> None:
    """Every folder from `root` down to `path`'s parent is a real folder, not a symlink (FileExistsError
    naming the link otherwise)."""
    root, path = Path(root), Path(path)
    current = root
    for part in path.relative_to(root).parts[:-1]:
        current = current / part
        if current.is_symlink():
            raise FileExistsError(f"{current} is a symbolic link inside {root}: avtune does not write through it")


def make_parents_inside(root: Path, path: Path) -> Path:
    """`path`'s folders under `root` created, none of them a symlink (`check_inside`); returns `path`."""
    check_inside(root, path)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    check_inside(root, path)  # a link made meanwhile is caught before the file is written
    return Path(path)


REPORT_MARKER = ".avtune-report"
# What a report folder holds (plots, tables, the page, findings.json, a half-written .partial).
_REPORT_NAME = re.compile(r"^(?:[\w.-]+\.(?:png|csv)|report\.html|findings\.json|\.[\w.-]+\.partial)$")


def claim_report_folder(out: Path) -> None:
    """`avtune report --out` / `build_report(out_dir=)` write only into a new or empty folder or one avtune's
    report made (its marker; or, from before the marker, nothing but report files, among them a report's
    findings.json): the report deletes its plot names there and replaces its page and tables."""
    def old_report(folder: Path) -> bool:
        try:
            findings = json.loads((folder / "findings.json").read_text())
        except (OSError, ValueError):
            return False
        return (isinstance(findings, dict) and "parent_run_id" in findings and "findings" in findings
                and all(_REPORT_NAME.match(p.name) and is_regular_file(p) for p in folder.iterdir()))

    claim_folder(out, REPORT_MARKER, "--out", legacy=old_report, refusal=(
        "avtune report, so no report is written into it (its report.html, CSVs and plots would be replaced): "
        "give a new or empty folder"))


def check_owned(path: Path, why: str) -> None:
    """`path` (a file avtune will unpickle, e.g. Tune's tuner.pkl on --resume) and its folder are owned by this
    user and writable by no one else, and `path` is a regular file: unpickling runs whatever code the file
    names, so only a file the user wrote may be read. PermissionError naming the file otherwise."""
    path = Path(path)
    for item in (path.parent, path):
        info = os.lstat(item)
        if item == path and not stat.S_ISREG(info.st_mode):
            raise PermissionError(f"{path}: not a regular file; {why} reads only a file this user wrote")
        if info.st_uid != os.geteuid():
            raise PermissionError(f"{item} is owned by uid {info.st_uid}, not by you (uid {os.geteuid()}); {why} "
                                  "unpickles it, which would run code of that user's choosing: move it away")
        if info.st_mode & (stat.S_IWGRP | stat.S_IWOTH) and not (item == path.parent and info.st_mode & stat.S_ISVTX):
            raise PermissionError(f"{item} is writable by other users (mode {stat.filemode(info.st_mode)}); {why} "
                                  f"unpickles {path.name}, which would run code anyone could put there: chmod go-w it")
