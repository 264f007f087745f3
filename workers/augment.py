"""Training-loader augmentation of the video frames, as the official loaders do it, on top of the decode-once cache.

The official loaders transform every training frame image on its own with
``Compose([RandomResizedCrop(224), RandomHorizontalFlip(), ToTensor(), Normalize(...)])``, so each frame gets
its own crop and its own flip, and evaluation frames only ``Resize((224, 224))``
(GeWu-Lab/OGM-GE_CVPR2022 dataset/CramedDataset.py lines 68-80, dataset/VGGSoundDataset.py lines 84-96,
dataset/dataset.py lines 80-93; MMPareto_ICML2024 code/dataset/av_dataset.py lines 76-88; the PMR and MLA loaders
the same). Which frames they take differs:

* OGM-GE's CramedDataset.py (lines 83-90) and VGGSoundDataset.py (lines 100-107), and PMR's CramedDataset.py,
  draw ``select_index = np.random.choice(len(image_samples), size=..., replace=False)`` and sort it, then read
  ``image_samples[i] for i in range(...)``: the draw is never used (PMR's copy keeps ``# for i in select_index:``
  commented out), so training and test both read the first entries of ``os.listdir``, in the file system's order.
* OGM-GE's dataset.py (Kinetics-Sounds, AVE; lines 95-111) and MLA's AVDataset take fixed frames
  (``seg * i + 1`` / ``seg * i``) in training and test alike.
* MMPareto's av_dataset.py (lines 90-103) draws one frame per segment in training
  (``random.randint(i*seg + 1, i*seg + seg)``) and takes the segment's middle frame in test.

Here, with ``data.augment.random_frames``, training draws ``num_frames`` of the ``data.decode.pool_frames``
frames decoded once per clip into the cache: ``frame_draw: choice`` draws them distinct and sorted (the draw
OGM-GE writes), ``frame_draw: segment`` one per equal segment of the pool (MMPareto's). Evaluation always takes
``num_frames`` uniformly spaced frames of the pool (:attr:`workers.datasets.AVClipDataset.eval_frames`).

Departure: crops are taken from the decoded frame (``frame_height x frame_width``) and resized back to that size,
not from the source-resolution image the official loaders crop before resizing to 224.

The crop, flip and frame draws use torch's global random generator, as torchvision's transforms do: seeded by
``train.seed`` in the training process and per DataLoader worker by the loader, different in every epoch.
:func:`crop_params` is torchvision's ``RandomResizedCrop.get_params`` line for line (the same draws, so the same
crops under the same seed; tests/test_augment.py compares them), and the resize is what torchvision's
``resized_crop`` runs for a uint8 tensor on the CPU (bilinear, antialiased, uint8 in and out); torchvision itself
is not imported (1.3 s and torch._dynamo in every Train worker, see models/encoders.py).
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
from torch.nn import functional as F
from torch.utils.data import Dataset

from workers.datasets import AVClipDataset
from workers.specs import AugmentSpec

__all__ = ["AugmentedClips", "for_training", "crop_params", "draw_frames", "augment_frames", "resized_crop"]


def crop_params(height: int, width: int, scale: Sequence[float], ratio: Sequence[float]) -> tuple[int, int, int, int]:
    """``(top, left, crop_height, crop_width)`` of a random resized crop of a ``height x width`` image.

    torchvision.transforms.RandomResizedCrop.get_params (torchvision 0.29.1, transforms/transforms.py), same
    random draws in the same order: an area share in ``scale`` and a log-uniform aspect ratio in ``ratio``, up to
    10 tries, then the central crop of the allowed ratio closest to the image's.
    """
    area = height * width
    log_ratio = torch.log(torch.tensor(ratio))
    for _ in range(10):
        target_area = area * torch.empty(1).uniform_(scale[0], scale[1]).item()
        aspect_ratio = torch.exp(torch.empty(1).uniform_(log_ratio[0], log_ratio[1])).item()
        w = int(round(math.sqrt(target_area * aspect_ratio)))
        h = int(round(math.sqrt(target_area / aspect_ratio)))
        if 0 < w <= width and 0 < h <= height:
            i = torch.randint(0, height - h + 1, size=(1,)).item()
            j = torch.randint(0, width - w + 1, size=(1,)).item()
            return i, j, h, w
    in_ratio = float(width) / float(height)
    if in_ratio < min(ratio):
        w = width
        h = int(round(w / min(ratio)))
    elif in_ratio > max(ratio):
        h = height
        w = int(round(h * max(ratio)))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def draw_frames(pool: int, count: int, how: str = "choice") -> torch.Tensor:
    """Sorted indices of ``count`` of ``pool`` frames (``pool >= count``), int64.

    ``choice``: distinct, uniformly drawn, sorted (``np.random.choice(pool, count, replace=False)`` + sort).
    ``segment``: one frame drawn uniformly in each of ``count`` equal segments (TSN / MMPareto training).
    """
    if not 0 < count <= pool:
        raise ValueError(f"cannot draw {count} of {pool} frames")
    if how == "choice":
        return torch.randperm(pool)[:count].sort().values
    if how == "segment":
        bounds = [k * pool // count for k in range(count + 1)]  # every segment holds >= 1 frame
        return torch.tensor([bounds[k] + int(torch.randint(bounds[k + 1] - bounds[k], (1,))) for k in range(count)])
    raise ValueError(f"frame draw must be 'choice' or 'segment', got {how!r}")


def resized_crop(image: torch.Tensor, top: int, left: int, height: int, width: int,
                 size: tuple[int, int]) -> torch.Tensor:
    """``image[..., top:top+height, left:left+width]`` of a ``(C, H, W)`` tensor resized to ``size``: bilinear,
    antialiased, ``align_corners=False``, as torchvision.transforms.v2.functional.resized_crop (uint8 in, uint8
    out: on the CPU natively, elsewhere through float32 and rounding, as torchvision does)."""
    crop = image[:, top:top + height, left:left + width]
    if (height, width) == tuple(size):
        return crop
    # Packed channels-last: the layout of the cached (H, W, 3) frames, and the fast one of the native uint8
    # kernel (a strided crop view took 1.3x as long; same values).
    x = crop.unsqueeze(0).contiguous(memory_format=torch.channels_last)
    native = x.dtype != torch.uint8 or x.device.type == "cpu"
    out = F.interpolate(x if native else x.float(), size=list(size), mode="bilinear", align_corners=False,
                        antialias=True)
    if not native:
        out = out.round_().to(torch.uint8)
    return out[0]


def augment_frames(frames: torch.Tensor, *, crop: bool, flip: bool, scale: Sequence[float] = (0.08, 1.0),
                   ratio: Sequence[float] = (3 / 4, 4 / 3)) -> torch.Tensor:
    """uint8 frames ``(T, H, W, 3)`` -> a new ``(T, H, W, 3)`` uint8 tensor, each frame with its own random
    resized crop (back to ``H x W``) when ``crop`` and its own horizontal flip (p = 0.5) when ``flip``: the
    draws of ``Compose([RandomResizedCrop((H, W)), RandomHorizontalFlip()])`` applied to every frame in turn."""
    count, height, width, _ = frames.shape
    out = torch.empty_like(frames, memory_format=torch.contiguous_format)
    for k in range(count):
        image = frames[k].permute(2, 0, 1)  # (3, H, W) view
        if crop:
            image = resized_crop(image, *crop_params(height, width, scale, ratio), size=(height, width))
        if flip and torch.rand(1) < 0.5:
            image = image.flip(-1)
        out[k].copy_(image.permute(1, 2, 0))
    return out


class AugmentedClips(Dataset):
    """The training view of an :class:`AVClipDataset`: its items, with the frames drawn from the clip's pool
    and cropped / flipped as ``augment`` says (``(audio, visual, label, index)``, the dataset's shapes).

    Only the training loader gets this view; the dataset itself (the ``train_eval``, ``val`` and ``test``
    loaders) stays un-augmented. The cached pool is read, never written.
    """

    def __init__(self, dataset: AVClipDataset, augment: AugmentSpec) -> None:
        self.dataset = dataset
        self.augment = augment
        self.num_frames = dataset.decode.num_frames
        self.pool_frames = dataset.decode.decoded_frames
        if augment.random_frames and self.pool_frames <= self.num_frames:
            raise ValueError(f"random_frames needs decode.pool_frames > num_frames ({self.num_frames}), "
                             f"got pool_frames {dataset.decode.pool_frames}")

    # what the engine and the methods read off a training dataset
    @property
    def records(self):
        return self.dataset.records

    @property
    def labels(self) -> torch.Tensor:
        return self.dataset.labels

    @property
    def class_names(self) -> list[str]:
        return self.dataset.class_names

    @property
    def num_classes(self) -> int:
        return self.dataset.num_classes

    def __len__(self) -> int:
        return len(self.dataset)

    def frame_indices(self) -> torch.Tensor | None:
        """Pool indices of one draw (``None``: the whole pool, when it holds exactly ``num_frames``)."""
        if self.augment.random_frames:
            return draw_frames(self.pool_frames, self.num_frames, self.augment.frame_draw)
        return self.dataset.eval_frames

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        tensors = self.dataset.clip_tensors(index)
        frames = tensors["frames"]
        chosen = self.frame_indices()
        if chosen is not None:
            frames = frames[chosen]
        a = self.augment
        if a.random_resized_crop or a.horizontal_flip:
            frames = augment_frames(frames, crop=a.random_resized_crop, flip=a.horizontal_flip,
                                    scale=a.crop_scale, ratio=a.crop_ratio)
        return (
            tensors["audio"],
            self.dataset.normalise(frames),
            torch.tensor(self.dataset.records[index].label, dtype=torch.int64),
            torch.tensor(index, dtype=torch.int64),
        )


def for_training(dataset: AVClipDataset, augment: AugmentSpec) -> Dataset:
    """What the training loader iterates: ``dataset`` itself when no augmentation is on, else its
    :class:`AugmentedClips` view."""
    return AugmentedClips(dataset, augment) if augment.active else dataset
