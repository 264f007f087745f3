"""Decode throughput: the AVClipDataset loader against a bare PyAV decode loop.

Generates the default synthetic set (6 classes x 50 clips of 1 s, 64x64, 10 fps, 16 kHz AAC),
timing the generation, then measures clips per second of

* ``bare PyAV``: open each file and decode every video and audio frame, nothing else;
* ``loader, no cache``: ``AVClipDataset[i]`` for every clip (decode 4 uniformly spaced frames,
  resample audio, log-mel 100x40, normalise);
* ``loader, warm cache``: the same after ``prefetch()``.

Targets: no-cache loader >= 0.9x bare decode; warm cache >= 20x bare decode.
Prints a table and writes ``benchmarks/results/decode.json``.

    python benchmarks/decode.py [--repeats 3] [--clips-per-class 50]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import av  # noqa: E402
import torch  # noqa: E402

from workers.datasets import AVClipDataset, DecodeParams  # noqa: E402
from workers.synth import synthesize_dataset  # noqa: E402

TARGET_NO_CACHE = 0.9
TARGET_WARM_CACHE = 20.0


def bare_decode(paths: list[Path]) -> None:
    """Decode every frame of every stream; no conversion, resampling or features."""
    for path in paths:
        with av.open(str(path)) as container:
            for _frame in container.decode(*container.streams):
                pass


def loader_pass(dataset: AVClipDataset) -> None:
    for index in range(len(dataset)):
        dataset[index]


def clips_per_second(run, count: int, repeats: int) -> dict[str, float]:
    rates = []
    for _ in range(repeats):
        started = time.perf_counter()
        run()
        rates.append(count / (time.perf_counter() - started))
    return {"median": statistics.median(rates), "best": max(rates), "runs": rates}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--clips-per-class", type=int, default=50)
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "decode.json")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="avtune-bench-") as tmp:
        root = Path(tmp) / "data"
        started = time.perf_counter()
        card = synthesize_dataset(root, clips_per_class=args.clips_per_class)
        synth_seconds = time.perf_counter() - started

        params = DecodeParams()  # 4 frames 64x64, 16 kHz, 1 s, log-mel 100x40
        datasets = {split: AVClipDataset(root, "avtune", split, params) for split in ("train", "val", "test")}
        cached = {
            split: AVClipDataset(root, "avtune", split, params, cache_dir=Path(tmp) / "cache")
            for split in ("train", "val", "test")
        }
        paths = [r.video_path for ds in datasets.values() for r in ds.records]
        count = len(paths)

        bare_decode(paths[:20])  # warm-up: page cache, codec init
        bare = clips_per_second(lambda: bare_decode(paths), count, args.repeats)
        no_cache = clips_per_second(lambda: [loader_pass(ds) for ds in datasets.values()], count, args.repeats)
        started = time.perf_counter()
        for ds in cached.values():
            ds.prefetch()
        prefetch_seconds = time.perf_counter() - started
        warm = clips_per_second(lambda: [loader_pass(ds) for ds in cached.values()], count, args.repeats)

    no_cache_ratio = no_cache["median"] / bare["median"]
    warm_ratio = warm["median"] / bare["median"]
    rows = [
        ("bare PyAV decode (all frames, all streams)", bare["median"], 1.0, "-"),
        ("AVClipDataset, no cache", no_cache["median"], no_cache_ratio, f">= {TARGET_NO_CACHE}x"),
        ("AVClipDataset, warm cache", warm["median"], warm_ratio, f">= {TARGET_WARM_CACHE:g}x"),
    ]
    print(f"{count} clips, median of {args.repeats} passes, torch threads {torch.get_num_threads()}, "
          f"{os.cpu_count()} CPUs")
    print(f"{'variant':<45} {'clips/s':>10} {'vs bare':>9} {'target':>9}")
    for name, rate, ratio, target in rows:
        print(f"{name:<45} {rate:>10.1f} {ratio:>8.2f}x {target:>9}")
    print(f"synthesis of the default set ({card['num_clips']} clips): {synth_seconds:.2f} s; "
          f"prefetch into the cache: {prefetch_seconds:.2f} s")

    result = {
        "benchmark": "decode",
        "clips": count,
        "repeats": args.repeats,
        "decode_params": params.model_dump(mode="json"),
        "synth": {"clips": card["num_clips"], "seconds": synth_seconds, "params": card["params"]},
        "clips_per_second": {"bare_pyav": bare, "loader_no_cache": no_cache, "loader_warm_cache": warm},
        "ratio_vs_bare": {"loader_no_cache": no_cache_ratio, "loader_warm_cache": warm_ratio},
        "targets": {
            "loader_no_cache": TARGET_NO_CACHE,
            "loader_warm_cache": TARGET_WARM_CACHE,
            "met": {"loader_no_cache": no_cache_ratio >= TARGET_NO_CACHE,
                    "loader_warm_cache": warm_ratio >= TARGET_WARM_CACHE},
        },
        "prefetch_seconds": prefetch_seconds,
        "environment": {
            "python": platform.python_version(),
            "av": av.__version__,
            "torch": torch.__version__,
            "cpus": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "machine": platform.machine(),
        },
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
