"""MMPareto (Wei & Hu, "MMPareto: Boosting Multimodal Learning with Innocent Unimodal Assistance", ICML 2024).

Multitask view of a late-fusion audio-visual classifier: the multimodal loss ``L_m = CE(joint logits)``
and one uni-modal loss per modality ``L_a = CE(audio head)``, ``L_v = CE(visual head)``. Each uni-modal
encoder receives two gradients, ``g_m`` (of ``L_m``) and ``g_u`` (of its own ``L_u``); they are combined
per encoder as the official ``MMPareto_ICML2024/code/MMPareto.py`` ``train_epoch`` does:

1. ``cos = cosine(g_m, g_u)`` over the encoder's concatenated gradient (``F.cosine_similarity(...,
   dim=0)`` on ``grads_*[...]["concat"]``);
2. ``cos > 0``: weights ``(1/2, 1/2)``; otherwise the two-task min-norm (Pareto / MGDA) weights
   ``(c, 1 - c)`` of ``min_c ||c g_m + (1 - c) g_u||`` (``MinNormSolver.find_min_norm_element`` with
   two vectors, i.e. ``_min_norm_element_from2``, closed form; Sener & Koltun 2018);
3. per parameter tensor ``p`` of the encoder: ``new = 2 w_m g_m[p] + 2 w_u g_u[p]``,
   ``diff = ||g_m[p] + g_u[p]|| / ||new||`` (the numerator is the norm of that tensor's gradient of
   ``L_m + L_a + L_v``, official ``three_norm``), and ``grad[p] = gamma * diff * new`` if ``diff > 1``
   else ``gamma * new``, with ``gamma = 1.5`` (official ``gamma=1.5``).

So without a conflict the encoder gets ``1.5 (g_m + g_u)``; with one, the Pareto direction scaled up per
tensor to at least the magnitude of the plain sum, times 1.5 (the paper's "enhanced magnitude").
The heads (joint head and the two uni-modal heads) keep the ordinary gradients of ``L_m + L_a + L_v``.

The network (:class:`MMParetoClassifier`) is official ``models/models.py`` ``AVClassifier``: two
ResNet-18 encoders with pooled 512-d features, a joint ``Linear(1024, K)`` on ``cat(a, v)``
(``self.head``) and separate uni-modal ``Linear(512, K)`` heads on each encoder's features
(``self.head_audio`` / ``self.head_video``), not slices of the fused classifier.

Pure PyTorch: no Ray, no MLflow.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch
from torch import Tensor, nn

from .encoders import build_audio_encoder, build_visual_encoder
from .fusion import build_fusion
from .outputs import AVOutput

__all__ = [
    "MMParetoClassifier",
    "MMParetoWeights",
    "build_mmpareto_classifier",
    "combination_weights",
    "combine_gradients",
    "min_norm_weights",
    "official_bn_init",
]

# MinNormSolver._min_norm_element_from2's clipped weights when the minimum lies at an end point.
_END_WEIGHT_HIGH = 0.999
_END_WEIGHT_LOW = 0.001


def min_norm_weights(v11: Tensor, v12: Tensor, v22: Tensor) -> Tensor:
    """Weight ``c`` of ``x1`` in ``argmin_{c in [0, 1]} ||c x1 + (1 - c) x2||^2`` from the dot products.

    Closed form of official ``min_norm_solvers.py`` ``MinNormSolver._min_norm_element_from2``
    (two-vector case of ``find_min_norm_element``, which returns ``[c, 1 - c]``):

    * ``<x1,x2> >= <x1,x1>``: ``c = 0.999`` (the minimum is at x1's end);
    * else ``<x1,x2> >= <x2,x2>``: ``c = 0.001`` (at x2's end);
    * else ``c = (<x2,x2> - <x1,x2>) / (<x1,x1> + <x2,x2> - 2 <x1,x2>)``.

    Branch-free (``torch.where``) so no host sync is needed. Args are 0-d tensors; returns a 0-d tensor.
    Scale-invariant: multiplying every dot product by the same positive factor gives the same ``c``
    (official sums each dot product twice, per tensor and over its "concat" entry; that changes nothing).
    """
    interior = (v22 - v12) / (v11 + v22 - 2 * v12)
    high = torch.full_like(interior, _END_WEIGHT_HIGH)
    low = torch.full_like(interior, _END_WEIGHT_LOW)
    return torch.where(v12 >= v11, high, torch.where(v12 >= v22, low, interior))


class MMParetoWeights(NamedTuple):
    """Per-encoder combination: ``cos`` of (g_m, g_u), weights ``w_multi`` (of g_m) and ``w_uni`` (of g_u)."""

    cos: Tensor
    w_multi: Tensor
    w_uni: Tensor


def combination_weights(g_multi: Tensor, g_uni: Tensor) -> MMParetoWeights:
    """Official ``train_epoch``: ``cos > 0`` -> ``(0.5, 0.5)``; else the min-norm weights of the pair.

    Args:
        g_multi: (P,) the encoder's gradient of the multimodal loss, all its tensors flattened and concatenated.
        g_uni: (P,) the same encoder's gradient of its uni-modal loss.
    Returns:
        0-d tensors ``cos``, ``w_multi``, ``w_uni`` (``w_multi + w_uni == 1``).
    """
    if g_multi.dim() != 1 or g_multi.shape != g_uni.shape:
        raise ValueError(f"g_multi and g_uni must be flat vectors of one length, got {tuple(g_multi.shape)} "
                         f"and {tuple(g_uni.shape)}")
    # official: this_cos_* = F.cosine_similarity(grads['both']["concat"], grads[uni]["concat"], dim=0)
    cos = torch.nn.functional.cosine_similarity(g_multi, g_uni, dim=0)
    c = min_norm_weights(g_multi @ g_multi, g_multi @ g_uni, g_uni @ g_uni)
    half = torch.full_like(c, 0.5)
    # official: if this_cos > 0: k = [0.5, 0.5] else: k = MinNormSolver.find_min_norm_element(...)
    w_multi = torch.where(cos > 0, half, c)
    return MMParetoWeights(cos, w_multi, 1 - w_multi)


def combine_gradients(
    grads_multi: Sequence[Tensor],
    grads_uni: Sequence[Tensor],
    weights: MMParetoWeights,
    gamma: float,
    grads_sum: Sequence[Tensor] | None = None,
) -> list[Tensor]:
    """The encoder's final gradient, tensor by tensor (official ``train_epoch``, the loop after
    ``loss.backward()``):

    ``new = 2 w_m g_m + 2 w_u g_u``; ``diff = ||g_sum|| / ||new||``;
    ``grad = diff * new * gamma`` if ``diff > 1`` else ``new * gamma``.

    Args:
        grads_multi, grads_uni: one tensor per encoder parameter (any shapes, pairwise equal).
        weights: from :func:`combination_weights`.
        gamma: the magnitude factor (official ``gamma = 1.5``).
        grads_sum: per tensor, the gradient of ``L_m + L_a + L_v`` (official ``param.grad`` after
            ``loss.backward()``, whose norm is ``three_norm``); ``g_m + g_u`` when None, which is the
            same gradient since the other modality's uni-modal loss does not reach this encoder.
    Returns:
        one tensor per parameter, shapes as given.

    Departure (degenerate case only): where ``||new|| == 0`` official divides by zero (``diff`` inf,
    ``grad`` NaN when ``||g_sum|| > 0``); here ``diff`` counts as 1 there, so the tensor gets ``0``.
    """
    if len(grads_multi) != len(grads_uni) or (grads_sum is not None and len(grads_sum) != len(grads_multi)):
        raise ValueError("grads_multi, grads_uni (and grads_sum) must list the same parameters")
    out = []
    for i, (gm, gu) in enumerate(zip(grads_multi, grads_uni)):
        new = 2 * weights.w_multi * gm + 2 * weights.w_uni * gu
        summed = gm + gu if grads_sum is None else grads_sum[i]
        new_norm = torch.linalg.vector_norm(new)
        diff = torch.linalg.vector_norm(summed) / new_norm
        # diff > 1 is False for NaN (0/0), as in official; the new_norm guard is ours (see above).
        scale = torch.where((diff > 1) & (new_norm > 0), diff, torch.ones_like(diff))
        out.append(scale * new * gamma)
    return out


def official_bn_init(module: nn.Module) -> None:
    """Official ``models/backbone.py`` ``ResNet.__init__``: BatchNorm/GroupNorm weight ~ N(1, 0.02),
    bias 0 (convs are Kaiming-normal fan_out there and in :mod:`models.encoders` alike)."""
    for m in module.modules():
        if isinstance(m, (nn.modules.batchnorm._BatchNorm, nn.GroupNorm)) and m.weight is not None:
            nn.init.normal_(m.weight, mean=1.0, std=0.02)
            nn.init.zeros_(m.bias)


class MMParetoClassifier(nn.Module):
    """Official ``AVClassifier`` (MMPareto_ICML2024/code/models/models.py).

    ``forward(audio (B, 1, T, F), visual (B, 3, T, H, W)) -> AVOutput(logits, logits_audio, logits_visual)``,
    all (B, K): ``logits = fusion(a, v)`` (official: ``head = Linear(D_a + D_v, K)`` on ``cat(a, v)``,
    i.e. ``fusion="concat"``), ``logits_audio = head_audio(a)``, ``logits_visual = head_visual(v)``
    with separate, trained uni-modal linear heads (official ``head_audio`` / ``head_video``).

    The heads keep PyTorch's default ``nn.Linear`` init: official ``MMPareto.py`` never applies
    ``weight_init``. ``has_probe_heads`` is False: the uni-modal heads are trained, and their losses
    train the encoders.
    """

    has_probe_heads = False

    def __init__(self, audio_encoder: nn.Module, visual_encoder: nn.Module, num_classes: int,
                 fusion: str = "concat") -> None:
        super().__init__()
        self.audio_encoder = audio_encoder
        self.visual_encoder = visual_encoder
        self.fusion_name = fusion
        self.fusion = build_fusion(fusion, audio_encoder.out_dim, visual_encoder.out_dim, num_classes)
        self.head_audio = nn.Linear(audio_encoder.out_dim, num_classes)
        self.head_visual = nn.Linear(visual_encoder.out_dim, num_classes)

    def forward(self, audio: Tensor, visual: Tensor) -> AVOutput:
        a = self.audio_encoder(audio)
        v = self.visual_encoder(visual)
        _, _, logits = self.fusion(a, v)
        return AVOutput(logits, self.head_audio(a), self.head_visual(v))


def build_mmpareto_classifier(
    num_classes: int,
    fusion: str = "concat",
    audio_arch: str = "resnet18",
    visual_arch: str = "resnet18",
    width: int = 64,
) -> MMParetoClassifier:
    """The MMPareto network; encoders from :mod:`models.encoders` with official BatchNorm init."""
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"num_classes must be a positive int, got {num_classes!r}")
    audio, visual = build_audio_encoder(audio_arch, width), build_visual_encoder(visual_arch, width)
    official_bn_init(audio)
    official_bn_init(visual)
    return MMParetoClassifier(audio, visual, num_classes, fusion)
