"""Output container shared by every audio-visual model in :mod:`models`."""

from __future__ import annotations

from typing import NamedTuple

from torch import Tensor


class AVOutput(NamedTuple):
    """Logits returned by every classifier in :mod:`models`.

    A ``NamedTuple`` (not a dataclass) so that ``DistributedDataParallel`` can traverse
    it to find the output tensors.

    Attributes:
        logits: (B, K) joint logits; for a uni-modal model, that modality's logits.
        logits_audio: (B, K) audio-only logits, or ``None`` when the model has no audio path.
        logits_visual: (B, K) visual-only logits, or ``None`` when the model has no visual path.
    """

    logits: Tensor
    logits_audio: Tensor | None = None
    logits_visual: Tensor | None = None
