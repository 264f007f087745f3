"""Training augmentation (workers/augment.py) on real PyAV-encoded clips: the spec's checks, the frame pool in
the decode-once cache, random frame draws, per-frame crops and flips (against torchvision itself), and that only
the training loader is augmented."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader, Subset

from workers.augment import AugmentedClips, augment_frames, crop_params, draw_frames, for_training
from workers.cache import ClipCache, DecodeParams, cache_key, decode_entry
from workers.datasets import AVClipDataset
from workers.media import uniform_frame_indices
from workers.specs import AugmentSpec, SpecError, load_spec

# synth_dataset: 1 s clips at 8 fps, 32 x 32; a pool of 8 frames is every frame of the window.
PLAIN = DecodeParams(num_frames=4, frame_height=32, frame_width=32, clip_seconds=1.0)
POOL = PLAIN.model_copy(update={"pool_frames": 8})
ALL_ON = AugmentSpec(random_frames=True, random_resized_crop=True, horizontal_flip=True)


@pytest.fixture(scope="module")
def pooled(synth_dataset, tmp_path_factory) -> AVClipDataset:
    ds = AVClipDataset(synth_dataset, "avtune", "train", POOL, cache_dir=tmp_path_factory.mktemp("augment-cache"))
    ds.prefetch()
    return ds


def _spec(root: Path, cache: Path, decode: dict, augment: dict, **data):
    return load_spec({"name": "augment", "data": {"source": "dataset", "root": str(root), "cache_dir": str(cache),
                                                  "decode": decode, "augment": augment, **data},
                      "model": {"width": 8}, "train": {"epochs": 1}})


def _pool_positions(item_frames: torch.Tensor, pool: torch.Tensor) -> list[int]:
    """Pool index of each of an item's (un-cropped) frames, found by exact equality."""
    positions = []
    for frame in item_frames:
        matches = [p for p in range(pool.shape[0]) if torch.equal(frame, pool[p])]
        assert len(matches) == 1, "every pool frame of a generated clip is distinct (pixel noise)"
        positions.append(matches[0])
    return positions


# ---- spec -------------------------------------------------------------------------------------------


@pytest.mark.timeout(60)
@pytest.mark.parametrize("data, message", [
    ({"augment": {"random_frames": True}}, "data.augment.random_frames needs data.decode.pool_frames > "
                                           "data.decode.num_frames"),
    ({"decode": {"num_frames": 4, "pool_frames": 4}, "augment": {"random_frames": True}},
     "got pool_frames 4, num_frames 4"),
    ({"decode": {"num_frames": 4, "pool_frames": 3}}, "pool_frames 3 is smaller than num_frames 4"),
    ({"augment": {"crop_scale": [0.5, 0.2]}}, "data.augment.crop_scale: Value error, crop_scale [0.5, 0.2]"),
    ({"augment": {"crop_scale": [0.0, 1.0]}}, "need 0 < low <= high <= 1"),
    ({"augment": {"crop_scale": [0.5, 1.5]}}, "need 0 < low <= high <= 1"),
    ({"augment": {"crop_ratio": [1.5, 0.5]}}, "data.augment.crop_ratio: Value error"),
    ({"augment": {"crop_ratio": [-1, 2]}}, "data.augment.crop_ratio: Value error"),
    ({"augment": {"frame_draw": "segment"}}, "frame_draw 'segment' only applies with random_frames"),
    ({"augment": {"frame_draw": "middle"}}, "data.augment.frame_draw"),
    ({"augment": {"flip": True}}, "data.augment.flip: unknown field"),
    ({"decode": {"pool_frames": 0}}, "data.decode.pool_frames"),
])
def test_spec_refuses_inconsistent_augmentation(data, message):
    with pytest.raises(SpecError) as err:
        load_spec({"data": data})
    assert message in str(err.value)


@pytest.mark.timeout(60)
def test_spec_defaults_are_off_and_an_unset_pool_changes_no_cache_key():
    spec = load_spec({})
    assert not spec.data.augment.active and spec.data.decode.pool_frames is None
    assert spec.data.augment.crop_scale == (0.08, 1.0) and spec.data.augment.crop_ratio == (3 / 4, 4 / 3)
    # pool_frames None is left out of dumps: the cache key and the logged decode parameters stay as they were
    assert "pool_frames" not in PLAIN.model_dump(mode="json")
    assert cache_key(PLAIN) == cache_key(DecodeParams.model_validate(PLAIN.model_dump(mode="json")))
    assert cache_key(POOL) != cache_key(PLAIN) and POOL.model_dump(mode="json")["pool_frames"] == 8
    on = load_spec({"data": {"decode": {"pool_frames": 8}, "augment": {
        "random_frames": True, "frame_draw": "segment", "random_resized_crop": True, "horizontal_flip": True,
        "crop_scale": [0.5, 1.0]}}})
    assert on.data.augment.active and on.data.decode.decoded_frames == 8 and on.data.decode.num_frames == 4
    assert AugmentSpec(horizontal_flip=True).active and not AugmentSpec().active
    # a Train worker validates the spec it receives as plain data back into the same models
    assert load_spec(on.model_dump(mode="json")) == on


# ---- the pool in the cache and the evaluation frames ---------------------------------------------------


@pytest.mark.timeout(180)
def test_the_pool_is_cached_once_and_evaluation_takes_its_uniform_frames(synth_dataset, pooled, tmp_path):
    cache = ClipCache(tmp_path, POOL)
    record = pooled.records[0]
    tensors = pooled.clip_tensors(0)
    assert tensors["frames"].shape == (8, 32, 32, 3) and tensors["frames"].dtype == torch.uint8
    # the entry on disk holds the pool (frames shape follows pool_frames)
    entries = list((pooled.cache.directory).glob("*.avc"))
    assert len(entries) == len(pooled) and pooled.prefetch() == 0  # all hits now
    assert cache._frames_shape == (8, 32, 32, 3)
    assert torch.equal(pooled.cache.load(pooled.cache.key(record.video_path, record.audio_path))["frames"],
                       tensors["frames"])
    # evaluation: num_frames uniformly spaced pool frames; with an 8-frame window they are the frames a
    # plain 4-frame decode picks, so the items are identical
    assert pooled.eval_frames.tolist() == uniform_frame_indices(8, 4) == [1, 3, 5, 7]
    plain = AVClipDataset(synth_dataset, "avtune", "train", PLAIN)
    for index in (0, len(plain) - 1):
        ours, theirs = pooled[index], plain[index]
        assert ours[1].shape == (3, 4, 32, 32)
        for a, b in zip(ours, theirs):
            assert torch.equal(a, b)


# ---- augmentation off / evaluation untouched ----------------------------------------------------------


@pytest.mark.timeout(180)
def test_without_augmentation_the_training_items_are_the_datasets(pooled):
    assert for_training(pooled, AugmentSpec()) is pooled
    view = AugmentedClips(pooled, AugmentSpec())  # the wrapper's own path with nothing on
    assert len(view) == len(pooled) and view.num_classes == pooled.num_classes and view.records is pooled.records
    for index in range(len(pooled)):
        for a, b in zip(view[index], pooled[index]):
            assert torch.equal(a, b)


@pytest.mark.timeout(240)
def test_only_the_training_loader_is_augmented(synth_dataset, tmp_path):
    from workers.engine import Runtime, build_datasets, build_loaders

    spec = _spec(synth_dataset, tmp_path / "cache", {**PLAIN.model_dump(mode="json"), "pool_frames": 8},
                 {"random_frames": True, "random_resized_crop": True, "horizontal_flip": True})
    datasets = build_datasets(spec)
    loaders = build_loaders(spec, datasets, Runtime())
    train = loaders["train"].dataset
    assert isinstance(train, AugmentedClips) and train.dataset is datasets["train"]
    for name, split in (("train_eval", "train"), ("val", "val"), ("test", "test")):
        assert loaders[name].dataset is datasets[split]
        batches = list(loaders[name])
        visual = torch.cat([b[1] for b in batches])
        expected = torch.stack([datasets[split][i][1] for i in range(len(datasets[split]))])
        assert torch.equal(visual, expected), name  # the same every time: no augmentation
    # the training batches are augmented: not the evaluation items of the same clips
    audio, visual, labels, index = next(iter(loaders["train"]))
    assert visual.shape[1:] == (3, 4, 32, 32)
    plain = torch.stack([datasets["train"][int(i)][1] for i in index])
    assert not torch.equal(visual, plain)
    assert torch.equal(audio, torch.stack([datasets["train"][int(i)][0] for i in index]))  # audio is not touched


# ---- frame draws ----------------------------------------------------------------------------------------


@pytest.mark.timeout(180)
@pytest.mark.parametrize("how", ["choice", "segment"])
def test_random_frames_are_sorted_distinct_pool_frames_that_vary(pooled, how):
    view = AugmentedClips(pooled, AugmentSpec(random_frames=True, frame_draw=how))
    pool = pooled.normalise(pooled.clip_tensors(2)["frames"]).transpose(0, 1)  # (8, 3, H, W)
    torch.manual_seed(0)
    draws = set()
    for _ in range(40):
        visual = view[2][1]
        assert visual.shape == (3, 4, 32, 32)
        chosen = _pool_positions(visual.transpose(0, 1), pool)
        assert chosen == sorted(set(chosen)) and all(0 <= c < 8 for c in chosen)
        if how == "segment":  # one frame in each of 4 equal segments of 8: [0, 1], [2, 3], [4, 5], [6, 7]
            assert [c // 2 for c in chosen] == [0, 1, 2, 3]
        draws.add(tuple(chosen))
    assert len(draws) >= 8  # 70 possible draws of 4 of 8 (16 per segment): 40 draws are never all alike
    for _ in range(200):
        indices = draw_frames(8, 4, how)
        assert indices.dtype == torch.int64 and indices.tolist() == sorted(set(indices.tolist()))
    assert draw_frames(4, 4, how).tolist() == [0, 1, 2, 3]
    with pytest.raises(ValueError):
        draw_frames(3, 4, how)


@pytest.mark.timeout(60)
def test_choice_draws_every_frame_equally_often():
    torch.manual_seed(0)
    counts = torch.zeros(8)
    for _ in range(4000):
        counts[draw_frames(8, 3, "choice")] += 1
    assert torch.allclose(counts / counts.sum(), torch.full((8,), 1 / 8), atol=0.01)


# ---- crops and flips ------------------------------------------------------------------------------------


@pytest.mark.timeout(120)
def test_flip_flips_each_frame_on_its_own(pooled):
    frames = pooled.clip_tensors(1)["frames"][:6]
    torch.manual_seed(1)
    expected_flips = [bool(torch.rand(1) < 0.5) for _ in range(6)]  # the draws RandomHorizontalFlip makes
    assert 0 < sum(expected_flips) < 6
    torch.manual_seed(1)
    out = augment_frames(frames, crop=False, flip=True)
    for k, flipped in enumerate(expected_flips):
        want = torch.flip(frames[k], dims=[1]) if flipped else frames[k]  # (H, W, 3): width is dim 1
        assert torch.equal(out[k], want), k
        assert not torch.equal(torch.flip(frames[k], dims=[1]), frames[k])  # a flip is visible on these frames
    assert frames.shape == out.shape and frames.data_ptr() != out.data_ptr()


@pytest.mark.timeout(120)
def test_crops_and_flips_are_torchvisions_per_frame(pooled):
    """The same seed gives what torchvision's RandomResizedCrop + RandomHorizontalFlip give frame by frame:
    exactly v2's (the native uint8 kernel), and v1's tensor path (resized through float32, then rounded) to
    one grey level."""
    from torchvision.transforms import Compose, RandomHorizontalFlip, RandomResizedCrop, v2

    frames = pooled.clip_tensors(0)["frames"]
    rectangular = torch.cat([frames, frames.flip(0)], dim=2)[:, :, :48]  # (8, 32, 48, 3): fallback crops too
    for clip in (frames, rectangular):
        t, h, w, _ = clip.shape
        official = {
            "v2": v2.Compose([v2.RandomResizedCrop((h, w), scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3), antialias=True),
                              v2.RandomHorizontalFlip()]),
            "v1": Compose([RandomResizedCrop((h, w), scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3), antialias=True),
                           RandomHorizontalFlip()]),
        }
        for seed in range(8):
            torch.manual_seed(seed)
            ours = augment_frames(clip, crop=True, flip=True)
            assert ours.shape == clip.shape and ours.dtype == torch.uint8
            for version, transform in official.items():
                torch.manual_seed(seed)
                theirs = torch.stack([transform(clip[k].permute(2, 0, 1)).permute(1, 2, 0) for k in range(t)])
                if version == "v2":
                    assert torch.equal(ours, theirs), seed
                else:
                    assert (ours.int() - theirs.int()).abs().max() <= 1, seed
        torch.manual_seed(0)
        assert not torch.equal(augment_frames(clip, crop=True, flip=False), clip)
    # the draws themselves, including the fallback of extreme ratios
    for scale, ratio in (((0.08, 1.0), (3 / 4, 4 / 3)), ((0.9, 1.0), (5.0, 6.0)), ((0.9, 1.0), (0.1, 0.2))):
        torch.manual_seed(1)
        ours = [crop_params(32, 48, scale, ratio) for _ in range(20)]
        torch.manual_seed(1)
        theirs = [RandomResizedCrop.get_params(torch.zeros(3, 32, 48), scale, ratio)
                  for _ in range(20)]
        assert ours == theirs


@pytest.mark.timeout(120)
def test_a_whole_frame_crop_is_the_frame(pooled):
    frames = pooled.clip_tensors(0)["frames"]
    torch.manual_seed(0)
    assert torch.equal(augment_frames(frames, crop=True, flip=False, scale=(1.0, 1.0), ratio=(1.0, 1.0)), frames)


@pytest.mark.timeout(180)
def test_augmented_items_have_the_datasets_shapes_and_range(pooled):
    view = AugmentedClips(pooled, ALL_ON)
    torch.manual_seed(0)
    audio, visual, label, index = view[5]
    ref = pooled[5]
    assert visual.shape == ref[1].shape == (3, 4, 32, 32) and visual.dtype == torch.float32
    assert torch.equal(audio, ref[0]) and int(label) == int(ref[2]) and int(index) == 5
    # normalised uint8 values: inside what 0 and 255 normalise to
    low, high = pooled.normalise(torch.zeros(1, 1, 1, 3, dtype=torch.uint8)), pooled.normalise(
        torch.full((1, 1, 1, 3), 255, dtype=torch.uint8))
    assert bool((visual >= low.view(3, 1, 1, 1) - 1e-6).all() and (visual <= high.view(3, 1, 1, 1) + 1e-6).all())
    # the cached pool is read, never written
    before = pooled.clip_tensors(5)["frames"].clone()
    for _ in range(5):
        view[5]
    assert torch.equal(pooled.clip_tensors(5)["frames"], before)


# ---- reproducibility ------------------------------------------------------------------------------------


@pytest.mark.timeout(180)
def test_the_same_seed_gives_the_same_augmentation(pooled):
    view = AugmentedClips(pooled, ALL_ON)

    def epoch(seed):
        torch.manual_seed(seed)
        return torch.stack([view[i][1] for i in range(len(view))])

    first, again, other = epoch(11), epoch(11), epoch(12)
    assert torch.equal(first, again)
    assert not torch.equal(first, other)


@pytest.mark.timeout(240)
def test_loader_workers_draw_differently_and_reproducibly(pooled):
    """DataLoader workers seed torch per worker: two workers never repeat each other's draws, and the
    loader's generator makes a pass reproducible."""
    view = AugmentedClips(pooled, ALL_ON)
    same_clip = Subset(view, [3] * 6)

    def batches(seed):
        loader = DataLoader(same_clip, batch_size=1, shuffle=False, num_workers=2,
                            generator=torch.Generator().manual_seed(seed))
        return [b[1] for b in loader]

    first = batches(5)
    assert all(not torch.equal(first[k], first[k + 1]) for k in range(0, 6, 2))  # worker 0 vs worker 1
    assert len({tuple(b.flatten()[:64].tolist()) for b in first}) == 6
    again = batches(5)
    assert all(torch.equal(a, b) for a, b in zip(first, again))


@pytest.mark.timeout(240)
def test_an_augmented_run_trains_and_evaluates_on_plain_clips(synth_dataset, tmp_path):
    from workers.engine import fit

    spec = _spec(synth_dataset, tmp_path / "cache", {**PLAIN.model_dump(mode="json"), "pool_frames": 8},
                 {"random_frames": True, "frame_draw": "segment", "random_resized_crop": True, "horizontal_flip": True,
                  "crop_scale": [0.25, 1.0]})
    history = fit(spec, report=lambda metrics, state: None)
    (metrics,) = history
    assert all(torch.isfinite(torch.tensor(metrics[k])) for k in ("loss_train", "acc", "test_acc"))
    # the cache holds the pools, 8 frames per clip (16 training clips of the one full batch, 3 val, 3 test)
    (folder,) = [d for d in (tmp_path / "cache").iterdir() if d.is_dir()]
    entries = sorted(folder.glob("*.avc"))
    assert len(entries) == 22
    assert all(decode_entry(bytearray(e.read_bytes()))[1]["frames"].shape == (8, 32, 32, 3) for e in entries)
