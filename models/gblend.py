"""Gradient-Blending (G-Blend).

Wang, Tran, Feiszli, "What Makes Training Multi-modal Classification Networks Hard?", CVPR 2020.
A late-fusion network with one classification head per modality plus a joint head on the
concatenated features, trained with a weighted sum of the heads' losses. The weights come from
each head's overfitting-to-generalization behaviour measured on held-out data (Sec. 3.3).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .av_classifier import ogm_ge_weight_init
from .encoders import build_audio_encoder, build_visual_encoder
from .outputs import AVOutput

__all__ = ["BLEND_KEYS", "BlendEstimate", "GBlendClassifier", "blended_loss", "build_gblend_classifier",
           "choose_estimation_window", "estimate_blend_weights", "estimate_from_histories"]

BLEND_KEYS: tuple[str, ...] = ("audio", "visual", "joint")


class GBlendClassifier(nn.Module):
    """Audio encoder, visual encoder, and three linear heads: audio, visual, joint (on cat[a, v]).

    ``forward(audio (B, 1, T, F), visual (B, 3, T, H, W)) -> AVOutput(logits=joint, logits_audio,
    logits_visual)``, all (B, K). Unlike OGM-GE's probes, the uni-modal heads are *not* detached:
    in G-Blend their weighted losses train the encoders.
    """

    def __init__(self, audio_encoder: nn.Module, visual_encoder: nn.Module, num_classes: int) -> None:
        super().__init__()
        self.audio_encoder = audio_encoder
        self.visual_encoder = visual_encoder
        self.audio_head = nn.Linear(audio_encoder.out_dim, num_classes)
        self.visual_head = nn.Linear(visual_encoder.out_dim, num_classes)
        self.joint_head = nn.Linear(audio_encoder.out_dim + visual_encoder.out_dim, num_classes)
        for head in (self.audio_head, self.visual_head, self.joint_head):
            head.apply(ogm_ge_weight_init)
        self.has_probe_heads = False

    def forward(self, audio: Tensor, visual: Tensor) -> AVOutput:
        a = self.audio_encoder(audio)
        v = self.visual_encoder(visual)
        joint = self.joint_head(torch.cat((a, v), dim=1))
        return AVOutput(joint, self.audio_head(a), self.visual_head(v))


def build_gblend_classifier(
    num_classes: int, audio_arch: str = "resnet18", visual_arch: str = "resnet18", width: int = 64
) -> GBlendClassifier:
    """G-Blend network; archs and ``width`` as in :mod:`models.encoders`."""
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"num_classes must be a positive int, got {num_classes!r}")
    audio_encoder = build_audio_encoder(audio_arch, width)
    return GBlendClassifier(audio_encoder, build_visual_encoder(visual_arch, width), num_classes)


def _check_keys(mapping: Mapping[str, object], name: str, expected: set[str] | None = None) -> None:
    expected = set(BLEND_KEYS) if expected is None else expected
    if set(mapping) != expected:
        raise ValueError(f"{name} must have exactly the keys {sorted(expected)}, got {sorted(mapping)}")


def blended_loss(output: AVOutput, labels: Tensor, weights: Mapping[str, float]) -> Tensor:
    """G-Blend training loss ``sum_k w_k * CE(logits_k, labels)`` over k in {audio, visual, joint}.

    Every term is computed even when its weight is 0, so all heads stay in the autograd graph
    (``DistributedDataParallel`` without ``find_unused_parameters`` expects that).

    Args:
        output: from :class:`GBlendClassifier` (needs ``logits_audio`` and ``logits_visual``).
        labels: (B,) class indices.
        weights: keys "audio", "visual", "joint"; non-negative finite floats.
    """
    _check_keys(weights, "weights")
    for key, w in weights.items():
        if not (isinstance(w, (int, float)) and not isinstance(w, bool) and math.isfinite(w) and w >= 0):
            raise ValueError(f"weights[{key!r}] must be a non-negative finite number, got {w!r}")
    if output.logits_audio is None or output.logits_visual is None:
        raise ValueError("output must carry logits_audio and logits_visual for blended_loss (got None)")
    logits = {"audio": output.logits_audio, "visual": output.logits_visual, "joint": output.logits}
    return sum(weights[k] * F.cross_entropy(logits[k], labels) for k in BLEND_KEYS)


def estimate_blend_weights(
    losses_at_n: Mapping[str, tuple[float, float]],
    losses_at_n_plus: Mapping[str, tuple[float, float]],
    eps: float = 1e-8,
) -> dict[str, float]:
    """G-Blend weights from each head's losses at epochs N and N+n (paper Sec. 3.3).

    With ``L^T`` the training loss and ``L^V`` the held-out loss (the paper's estimate of L*):

    * overfitting ``O = L^V - L^T``; ``dO = O(N+n) - O(N)``;
    * generalisation ``dG = L^V(N) - L^V(N+n)``;
    * ``w_k = (1/Z) * dG_k / dO_k^2`` with Z normalising the weights to sum to 1 (the paper's
      optimal blend, Proposition 1, with sigma_k^2 estimated by dO_k^2; its overfitting-to-
      generalisation ratio is OGR = |dO / dG|).

    Guards (not in the paper, which assumes dG > 0 and dO != 0):

    * ``dG_k <= 0``: the head did not generalise better over the window; weight 0;
    * ``dO_k^2 < eps``: the denominator is floored at ``eps``;
    * every weight 0: uniform weights ``1 / len(heads)``.

    Args:
        losses_at_n: ``{head: (train_loss, val_loss)}`` at epoch N.
        losses_at_n_plus: same heads at epoch N + n.
        eps: floor on ``dO^2``, > 0.

    Returns:
        ``{head: weight}`` in the order of ``losses_at_n``, summing to 1.
    """
    if not (isinstance(eps, (int, float)) and math.isfinite(eps) and eps > 0):
        raise ValueError(f"eps must be a positive finite number, got {eps!r}")
    if not losses_at_n:
        raise ValueError("losses_at_n must name at least one head, got an empty mapping")
    _check_keys(losses_at_n_plus, "losses_at_n_plus", expected=set(losses_at_n))
    raw: dict[str, float] = {}
    for key in losses_at_n:
        pairs = []
        for name, table in (("losses_at_n", losses_at_n), ("losses_at_n_plus", losses_at_n_plus)):
            pair = table[key]
            if not (
                isinstance(pair, (tuple, list))
                and len(pair) == 2
                and all(isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) for x in pair)
            ):
                raise ValueError(
                    f"{name}[{key!r}] must be a (train_loss, val_loss) pair of finite numbers, got {pair!r}"
                )
            pairs.append((float(pair[0]), float(pair[1])))
        delta_g, delta_o = generalisation_and_overfitting(*pairs)
        raw[key] = delta_g / max(delta_o * delta_o, eps) if delta_g > 0 else 0.0
    total = sum(raw.values())
    if total <= 0:
        return {key: 1.0 / len(raw) for key in raw}
    return {key: value / total for key, value in raw.items()}


def generalisation_and_overfitting(at_n: tuple[float, float], at_n_plus: tuple[float, float]) -> tuple[float, float]:
    """``(dG, dO)`` of one head from its ``(train_loss, val_loss)`` at epochs N and N+n (Sec. 3.2):
    ``dG = L^V(N) - L^V(N+n)``, ``dO = (L^V - L^T)(N+n) - (L^V - L^T)(N)``."""
    (train_n, val_n), (train_np, val_np) = at_n, at_n_plus
    return val_n - val_np, (val_np - train_np) - (val_n - train_n)


def _falls(losses: Sequence[float], start_epochs: int, window_epochs: int) -> bool:
    """L^V(N) > L^V(N + n): the head still generalises over the window (``losses[e]`` after epoch e + 1)."""
    return losses[start_epochs - 1] > losses[start_epochs + window_epochs - 1]


def choose_estimation_window(val_losses: Mapping[str, Sequence[float]], latest_start_epochs: int,
                             window_epochs: int) -> int | None:
    """The epoch N at which to measure, or None: the latest N <= ``latest_start_epochs`` at which every
    head's validation loss still falls over the next ``window_epochs`` epochs (L^V(N) > L^V(N + n)).

    The paper fixes N in advance (Sec. 3.3) and assumes every head generalises over the window; a head
    whose validation loss has stopped falling by N would get dG <= 0 and no weight (on a joint head:
    a joint classifier that is never trained). Earlier windows of the same length are what the stage's
    own runs measured anyway. ``val_losses[head][e]`` is the loss after epoch e + 1.
    """
    if latest_start_epochs < 1 or window_epochs < 1:
        raise ValueError(f"N and n must be >= 1, got N={latest_start_epochs}, n={window_epochs}")
    for head, losses in val_losses.items():
        if len(losses) < latest_start_epochs + window_epochs:
            raise ValueError(f"head {head!r}: {len(losses)} epochs measured, N + n = "
                             f"{latest_start_epochs + window_epochs} needed")
    for start in range(latest_start_epochs, 0, -1):
        if all(_falls(losses, start, window_epochs) for losses in val_losses.values()):
            return start
    return None


@dataclass
class BlendEstimate:
    """What the offline estimation decided: the weights, the window they were measured on (None: no
    window in which every head generalised, and the weights are the uniform fallback), and the heads
    whose validation loss did not fall over the requested window, with those losses."""

    weights: dict[str, float]
    start_epochs: int | None
    window_epochs: int
    source: str  # "estimated" or "uniform_fallback"
    stalled: dict[str, tuple[float, float]] = field(default_factory=dict)
    # Per head, (dG, dO) on the window measured (the requested one for the fallback).
    deltas: dict[str, tuple[float, float]] = field(default_factory=dict)


def estimate_from_histories(histories: Mapping[str, Sequence[tuple[float, float]]], latest_start_epochs: int,
                            window_epochs: int, eps: float = 1e-8) -> BlendEstimate:
    """G-Blend weights from each head's per-epoch ``(train_loss, val_loss)``, measured on the window
    `choose_estimation_window` picks; uniform weights (1/3 each) when there is none, marked
    ``uniform_fallback`` so the caller says so. ``histories[head][e]`` is after epoch e + 1."""
    val = {head: [pair[1] for pair in rows] for head, rows in histories.items()}
    start = choose_estimation_window(val, latest_start_epochs, window_epochs)
    last = latest_start_epochs - 1
    stalled = {head: (losses[last], losses[last + window_epochs]) for head, losses in val.items()
               if not _falls(losses, latest_start_epochs, window_epochs)}
    measured = start or latest_start_epochs
    at_n = {head: tuple(rows[measured - 1]) for head, rows in histories.items()}
    at_n_plus = {head: tuple(rows[measured + window_epochs - 1]) for head, rows in histories.items()}
    deltas = {head: generalisation_and_overfitting(at_n[head], at_n_plus[head]) for head in histories}
    if start is None:
        return BlendEstimate({head: 1.0 / len(histories) for head in histories}, None, window_epochs,
                             "uniform_fallback", stalled, deltas)
    return BlendEstimate(estimate_blend_weights(at_n, at_n_plus, eps), start, window_epochs, "estimated", stalled,
                         deltas)
