"""Decode throughput: the AVClipDataset loader against a bare PyAV decode loop.

Generates the default synthetic set (6 classes x 50 clips of 1 s, 64x64, 10 fps, 16 kHz AAC),
timing the generation, then measures clips per second of

* ``bare PyAV``: open each file and decode every video and audio frame, nothing else (with
  PyAV's default decoder threading, and again single-threaded as the loader decodes);
* ``loader, no cache``: ``AVClipDataset[i]`` for every clip (decode 4 uniformly spaced frames,
  resample audio, log-mel 100x40, normalise);
* ``loader, warm cache``: the same after ``prefetch()``;
* augmentation (workers/augment.py), both warm: ``pool of 8``, the loader on entries holding 8 decoded frames
  of which an item takes 4 uniformly spaced (the evaluation path of a pool), and ``augmented``, the training
  view drawing 4 of the 8 frames and giving each its own random resized crop and horizontal flip; their
  per-round ratio to ``loader, warm cache`` (augmentation off) is the cost of augmenting.

Targets: no-cache loader >= 0.9x bare decode; warm cache >= 20x bare decode.
Prints a table and writes ``benchmarks/results/decode.json``.

    python benchmarks/decode.py [--repeats 5] [--clips-per-class 50]

The loops run in this process with ``--torch-threads`` (default 1, what DataLoader workers and
Ray Train workers use). An extra informational row repeats the no-cache loop with torch's default
thread count: on a small, busy machine GNU OpenMP's spin-waiting threads then compete with the
decoder for the cores (``OMP_WAIT_POLICY=PASSIVE`` removes that cost).
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

from workers.augment import AugmentedClips  # noqa: E402
from workers.datasets import AVClipDataset, DecodeParams  # noqa: E402
from workers.specs import AugmentSpec  # noqa: E402
from orchestrator.synth import synthesize_dataset  # noqa: E402

TARGET_NO_CACHE = 0.9
TARGET_WARM_CACHE = 20.0


def bare_decode(paths: list[Path], single_threaded: bool = False) -> None:
    """Decode every frame of every stream; no conversion, resampling or features.

    ``single_threaded`` turns off the decoder's thread pool, as the loader does.
    """
    for path in paths:
        with av.open(str(path)) as container:
            if single_threaded:
                for stream in container.streams.video:
                    stream.codec_context.thread_type = "NONE"
                    stream.codec_context.thread_count = 1
            for _frame in container.decode(*container.streams):
                pass


POOL_FRAMES = 8  # of the default clips' 10 frames (1 s at 10 fps)
AUGMENT = AugmentSpec(random_frames=True, random_resized_crop=True, horizontal_flip=True)


def loader_pass(dataset: AVClipDataset | AugmentedClips) -> None:
    for index in range(len(dataset)):
        dataset[index]


def timed_rate(run, count: int) -> float:
    started = time.perf_counter()
    run()
    return count / (time.perf_counter() - started)


def summary(rates: list[float]) -> dict[str, float | list[float]]:
    return {"median": statistics.median(rates), "best": max(rates), "runs": rates}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--torch-threads", type=int, default=1,
                        help="torch intra-op threads for the loader loops (DataLoader workers use 1)")
    parser.add_argument("--clips-per-class", type=int, default=50)
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "decode.json")
    args = parser.parse_args()
    default_threads = torch.get_num_threads()
    torch.set_num_threads(args.torch_threads)

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
        pooled = {
            split: AVClipDataset(root, "avtune", split, params.model_copy(update={"pool_frames": POOL_FRAMES}),
                                 cache_dir=Path(tmp) / "cache")
            for split in ("train", "val", "test")
        }
        augmented = {split: AugmentedClips(ds, AUGMENT) for split, ds in pooled.items()}
        paths = [r.video_path for ds in datasets.values() for r in ds.records]
        count = len(paths)

        bare_decode(paths[:20])  # warm-up: page cache, codec init
        started = time.perf_counter()
        for ds in cached.values():
            ds.prefetch()
        prefetch_seconds = time.perf_counter() - started
        started = time.perf_counter()
        for ds in pooled.values():
            ds.prefetch()
        prefetch_pool_seconds = time.perf_counter() - started
        torch.manual_seed(0)
        # Interleave the variants round by round so load from other processes hits them alike;
        # ratios are taken within a round, then the median over rounds.
        rates: dict[str, list[float]] = {
            "bare": [], "bare_single": [], "no_cache": [], "warm": [], "no_cache_default_threads": [],
            "warm_pool": [], "warm_augmented": [],
        }
        for _ in range(args.repeats):
            torch.set_num_threads(args.torch_threads)
            rates["bare"].append(timed_rate(lambda: bare_decode(paths), count))
            rates["bare_single"].append(timed_rate(lambda: bare_decode(paths, single_threaded=True), count))
            rates["no_cache"].append(timed_rate(lambda: [loader_pass(ds) for ds in datasets.values()], count))
            rates["warm"].append(timed_rate(lambda: [loader_pass(ds) for ds in cached.values()], count))
            rates["warm_pool"].append(timed_rate(lambda: [loader_pass(ds) for ds in pooled.values()], count))
            rates["warm_augmented"].append(timed_rate(lambda: [loader_pass(ds) for ds in augmented.values()], count))
            # informational: the same loop with torch's default thread count for this machine
            torch.set_num_threads(default_threads)
            rates["no_cache_default_threads"].append(
                timed_rate(lambda: [loader_pass(ds) for ds in datasets.values()], count)
            )
        torch.set_num_threads(args.torch_threads)
        bare, no_cache, warm = summary(rates["bare"]), summary(rates["no_cache"]), summary(rates["warm"])
        bare_single = summary(rates["bare_single"])
        default_threads_run = summary(rates["no_cache_default_threads"])
        warm_pool, warm_augmented = summary(rates["warm_pool"]), summary(rates["warm_augmented"])
        ratios_pool = [p / w for p, w in zip(rates["warm_pool"], rates["warm"])]
        ratios_augmented = [a / w for a, w in zip(rates["warm_augmented"], rates["warm"])]
        ratios_no_cache = [n / b for n, b in zip(rates["no_cache"], rates["bare"])]
        ratios_warm = [w / b for w, b in zip(rates["warm"], rates["bare"])]
        ratios_default = [n / b for n, b in zip(rates["no_cache_default_threads"], rates["bare"])]
        vs_single = {
            name: statistics.median([v / b for v, b in zip(rates[name], rates["bare_single"])])
            for name in ("bare", "no_cache", "warm", "warm_pool", "warm_augmented")
        }

    no_cache_ratio = statistics.median(ratios_no_cache)
    warm_ratio = statistics.median(ratios_warm)
    rows = [
        ("bare PyAV decode (all frames, all streams)", bare["median"], 1.0, vs_single["bare"], "-"),
        ("bare PyAV decode, single-threaded decoder", bare_single["median"], 1 / vs_single["bare"], 1.0, "-"),
        ("AVClipDataset, no cache", no_cache["median"], no_cache_ratio, vs_single["no_cache"],
         f">= {TARGET_NO_CACHE}x"),
        ("AVClipDataset, warm cache", warm["median"], warm_ratio, vs_single["warm"], f">= {TARGET_WARM_CACHE:g}x"),
        (f"AVClipDataset, no cache, {default_threads} torch threads", default_threads_run["median"],
         statistics.median(ratios_default), float("nan"), "(info)"),
        (f"warm cache, pool of {POOL_FRAMES}, augmentation off", warm_pool["median"],
         statistics.median([p / b for p, b in zip(rates["warm_pool"], rates["bare"])]), vs_single["warm_pool"],
         "(info)"),
        (f"warm cache, pool of {POOL_FRAMES}, frames+crop+flip", warm_augmented["median"],
         statistics.median([a / b for a, b in zip(rates["warm_augmented"], rates["bare"])]),
         vs_single["warm_augmented"], "(info)"),
    ]
    print(f"{count} clips; median of {args.repeats} interleaved rounds (ratio = median of per-round ratios); "
          f"torch threads {args.torch_threads}, {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f}")
    print(f"{'variant':<45} {'clips/s':>10} {'vs bare':>9} {'vs bare 1-thr':>14} {'target':>9}")
    for name, rate, ratio, ratio_single, target in rows:
        print(f"{name:<45} {rate:>10.1f} {ratio:>8.2f}x {ratio_single:>13.2f}x {target:>9}")
    print(f"augmentation, warm cache: {warm['median']:.1f} clips/s off, {warm_augmented['median']:.1f} on "
          f"(x{statistics.median(ratios_augmented):.3f}; {1e6 / warm_augmented['median'] - 1e6 / warm['median']:.0f} us "
          f"more per clip of {params.num_frames} frames of {params.frame_height}x{params.frame_width}); pool of "
          f"{POOL_FRAMES} unaugmented x{statistics.median(ratios_pool):.3f}")
    print(f"synthesis of the default set ({card['num_clips']} clips): {synth_seconds:.2f} s; "
          f"prefetch into the cache: {prefetch_seconds:.2f} s ({prefetch_pool_seconds:.2f} s with a pool of "
          f"{POOL_FRAMES})")

    result = {
        "benchmark": "decode",
        "clips": count,
        "repeats": args.repeats,
        "decode_params": params.model_dump(mode="json"),
        "synth": {"clips": card["num_clips"], "seconds": synth_seconds, "params": card["params"]},
        "clips_per_second": {"bare_pyav": bare, "bare_pyav_single_threaded": bare_single,
                             "loader_no_cache": no_cache, "loader_warm_cache": warm,
                             f"loader_no_cache_{default_threads}_torch_threads": default_threads_run,
                             "loader_warm_cache_pool": warm_pool, "loader_warm_cache_augmented": warm_augmented},
        "augmentation": {
            "augment": AUGMENT.model_dump(mode="json"),
            "pool_frames": POOL_FRAMES,
            "ratio_vs_warm_cache": {"pool_off": statistics.median(ratios_pool),
                                    "augmented": statistics.median(ratios_augmented),
                                    "per_round": {"pool_off": ratios_pool, "augmented": ratios_augmented}},
            "extra_microseconds_per_clip": 1e6 / warm_augmented["median"] - 1e6 / warm["median"],
        },
        "ratio_vs_bare_single_threaded": vs_single,
        "ratio_vs_bare": {"loader_no_cache": no_cache_ratio, "loader_warm_cache": warm_ratio,
                          "per_round": {"loader_no_cache": ratios_no_cache, "loader_warm_cache": ratios_warm}},
        "targets": {
            "loader_no_cache": TARGET_NO_CACHE,
            "loader_warm_cache": TARGET_WARM_CACHE,
            "met": {"loader_no_cache": no_cache_ratio >= TARGET_NO_CACHE,
                    "loader_warm_cache": warm_ratio >= TARGET_WARM_CACHE},
        },
        "prefetch_seconds": prefetch_seconds,
        "prefetch_pool_seconds": prefetch_pool_seconds,
        "environment": {
            "python": platform.python_version(),
            "av": av.__version__,
            "torch": torch.__version__,
            "cpus": os.cpu_count(),
            "torch_threads": args.torch_threads,
            "torch_threads_default": default_threads,
            "machine": platform.machine(),
            "load_average_1min_at_end": os.getloadavg()[0],
        },
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
