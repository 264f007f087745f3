"""A machine-wide cache of the installed dependencies, keyed on pyproject.toml, for `make setup`.

Installing the pinned torch/torchvision/torchaudio (a CUDA build on x86_64: ~5.5 GB unpacked), Ray,
MLflow and the rest from the local wheel store takes about 2 minutes on 2 cores; a fresh clone on a
machine that has done it once should not pay that again. `save` keeps a hard-linked copy of a
finished .venv (same file system: seconds, no extra space); `restore` hard-links it into a new
.venv and rewrites the few files that name the old location (script shebangs, activate scripts).
`make setup` then runs `pip install -e '.[dev]'` as always: with every dependency present, pip only
installs this checkout itself. A missing or half-written cache entry is ignored (pip installs
everything); a changed pyproject.toml is a different key.

    python tools/venv_cache.py restore CACHE_DIR VENV   # exit 1 when there is nothing to restore
    python tools/venv_cache.py save VENV CACHE_DIR
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

COMPLETE = ".avtune-cache-complete"


def _relink(source: Path, target: Path) -> None:
    """Copy the tree with hard links (falls back to a plain copy across file systems)."""
    result = subprocess.run(["cp", "-al", str(source), str(target)], capture_output=True, text=True)
    if result.returncode != 0:
        shutil.rmtree(target, ignore_errors=True)
        shutil.copytree(source, target, symlinks=True)


def _rewrite_paths(venv: Path, old: str, new: str) -> None:
    """Text files in bin/ that name the old venv path (shebangs, activate scripts) get the new one.
    Written as new files, so the hard-linked cache copy keeps its own text."""
    for path in (venv / "bin").iterdir():
        if path.is_symlink() or not path.is_file():
            continue
        data = path.read_bytes()
        if old.encode() not in data[:100_000]:
            continue
        mode = path.stat().st_mode
        tmp = path.with_name(path.name + ".relocate")
        tmp.write_bytes(data.replace(old.encode(), new.encode()))
        os.chmod(tmp, mode)
        os.replace(tmp, path)


def restore(cache: Path, venv: Path) -> int:
    if venv.exists() or not (cache / COMPLETE).is_file():
        return 1
    old = (cache / COMPLETE).read_text().strip()
    _relink(cache, venv)
    (venv / COMPLETE).unlink()
    _rewrite_paths(venv, old, str(venv.resolve()))
    print(f"dependencies restored from {cache}")
    return 0


def save(venv: Path, cache: Path) -> int:
    if (cache / COMPLETE).is_file():
        return 0
    partial = cache.with_name(cache.name + f".partial-{os.getpid()}")
    shutil.rmtree(partial, ignore_errors=True)
    cache.parent.mkdir(parents=True, exist_ok=True)
    _relink(venv, partial)
    # The stamp names the path the scripts were written for; written last, so a copy interrupted
    # halfway is never taken for a complete one.
    (partial / COMPLETE).write_text(str(venv.resolve()))
    try:
        os.rename(partial, cache)
    except OSError:  # another checkout saved it first
        shutil.rmtree(partial, ignore_errors=True)
    return 0


def main(argv: list[str]) -> int:
    if len(argv) != 3 or argv[0] not in ("restore", "save"):
        print(__doc__, file=sys.stderr)
        return 2
    if argv[0] == "restore":
        return restore(Path(argv[1]), Path(argv[2]))
    return save(Path(argv[1]), Path(argv[2]))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
