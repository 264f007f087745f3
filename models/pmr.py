"""Prototypical Modal Rebalance (PMR).

Fan, Xu, Wang, Wang, Guo, "PMR: Prototypical Modal Rebalance for Multimodal Learning", CVPR 2023
(arXiv:2211.07089). Follows the official Modal-Imbalance-PMR/main_Prototype_grad.py (HEAD 3615e48:
``calculate_prototype``, ``EU_dist``, ``train_epoch``) and, for the entropy term the official code
does not contain (its issues #4, #7, #9), the paper's Eq. 13 and Algorithm 1.

Modality 0 of the paper is audio, modality 1 visual (the official ``ratio_a_p = score_a_p / score_v_p``).
Notation: ``z`` a modality's representation (B, D), ``c`` its per-class prototypes (K, D), ``y`` labels (B,).

One training step, in the rebalancing window::

    logits_a = prototype_logits(z_a, c_a); logits_v = prototype_logits(z_v, c_v)      # -d(z, c), Eq. 7
    coeffs = pmr_coefficients_from_scores(*prototype_scores(logits_a, logits_v, y))   # Eq. 8 + Eq. 11
    loss = pmr_loss(CE(fused logits, y),
                    prototypical_cross_entropy(logits_a, y), prototypical_cross_entropy(logits_v, y),
                    prototype_entropy(logits_a), prototype_entropy(logits_v),
                    coeffs, pce_weight=alpha, entropy_weight=mu, entropy_on=epoch < E_r)  # Eq. 10 + 13

Prototypes (Eq. 6, 12) are recomputed once per epoch, without gradient, over a random subset of
the training split: :func:`prototype_subset`, then :func:`class_feature_sums` per batch (sum these
over DDP ranks so every rank holds identical prototypes), :func:`prototypes_from_sums` and
:func:`momentum_prototypes`.
"""

from __future__ import annotations

from typing import Literal, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "COEFFICIENT_RULES",
    "PMRCoefficients",
    "class_feature_sums",
    "momentum_prototypes",
    "pmr_coefficients_from_scores",
    "pmr_loss",
    "prototype_entropy",
    "prototype_logits",
    "prototype_scores",
    "prototype_subset",
    "prototypes_from_sums",
    "prototypical_cross_entropy",
]

# "indicator": official train_epoch (beta, lam in {0, 1}); "clipped_ratio": paper Eq. 11.
COEFFICIENT_RULES = ("indicator", "clipped_ratio")


class PMRCoefficients(NamedTuple):
    """Per-step coefficients (0-d float tensors, no gradient).

    Attributes:
        ratio_av: rho = s_a / s_v, the prototype-based imbalance ratio (Eq. 8; official ``ratio_a_p``).
        accel_audio: paper beta (official ``beta``, "audio coef"): weight, before alpha, of audio's PCE
            (Eq. 10) and, before mu, of *visual's* entropy regulariser (Eq. 13). Non-zero only when
            audio is the slow modality (rho < 1).
        accel_visual: paper gamma (official ``lam``, "visual coef"): weight of visual's PCE and of
            *audio's* entropy regulariser. Non-zero only when visual is the slow modality (rho > 1).
    """

    ratio_av: Tensor
    accel_audio: Tensor
    accel_visual: Tensor


def _check_features(features: Tensor, labels: Tensor | None = None) -> None:
    if features.dim() != 2:
        raise ValueError(f"features must be (B, D), got {tuple(features.shape)}")
    if labels is not None and labels.shape != features.shape[:1]:
        raise ValueError(f"labels must be (B,) = ({features.shape[0]},), got {tuple(labels.shape)}")


def prototype_subset(labels: Tensor, fraction: float, num_classes: int, generator: torch.Generator) -> Tensor:
    """Indices of the training clips the prototypes are computed over, drawn with ``generator``.

    Official ``calculate_prototype`` takes the first ``len(loader) // 10`` batches of the *shuffled*
    training loader: a fresh uniformly random tenth of the training split each time (paper Sec. 5.2,
    Tab. 5: "one-tenth the size of training data"). Here: ``max(1, floor(fraction * N))`` clips drawn
    uniformly without replacement. One departure: the official code divides by a class count that
    can be zero (a NaN prototype) when the subset misses a class; here one further random clip of
    every class the draw missed (and that the split has) is added.

    Args:
        labels: (N,) int64 class of every training clip.
        fraction: share of the training split, in (0, 1].
        num_classes: K.
        generator: CPU generator; seed it identically on every DDP rank.

    Returns:
        (M,) int64 indices, in draw order (missing-class additions last).
    """
    if labels.dim() != 1 or labels.numel() == 0:
        raise ValueError(f"labels must be a non-empty (N,) tensor, got shape {tuple(labels.shape)}")
    if not 0 < fraction <= 1:
        raise ValueError(f"fraction must be in (0, 1], got {fraction!r}")
    labels = labels.cpu().long()
    n = labels.numel()
    order = torch.randperm(n, generator=generator)
    chosen = order[: max(1, int(fraction * n))]
    present = torch.zeros(num_classes, dtype=torch.bool)
    present[labels[chosen]] = True
    extra = []
    for k in range(num_classes):
        if not present[k]:
            members = (labels == k).nonzero().flatten()
            if members.numel():
                extra.append(members[torch.randint(members.numel(), (1,), generator=generator)])
    return torch.cat([chosen, *extra]) if extra else chosen


@torch.no_grad()
def class_feature_sums(features: Tensor, labels: Tensor, num_classes: int) -> tuple[Tensor, Tensor]:
    """Per-class sums of ``features`` and per-class counts (numerator and denominator of Eq. 6).

    Official ``calculate_prototype`` accumulates ``prototypes[l] += z`` and ``count[l] += 1`` per clip;
    sums (not means) so that batches, and DDP ranks (all-reduce sum), add up exactly.

    Args:
        features: (B, D). labels: (B,) int64 in [0, K).

    Returns:
        ``(sums (K, D) float32, counts (K,) float32)``.
    """
    _check_features(features, labels)
    features = features.detach().float()
    sums = features.new_zeros(num_classes, features.shape[1]).index_add_(0, labels.long(), features)
    counts = features.new_zeros(num_classes).index_add_(0, labels.long(), features.new_ones(labels.shape[0]))
    return sums, counts


@torch.no_grad()
def prototypes_from_sums(sums: Tensor, counts: Tensor, previous: Tensor | None = None) -> Tensor:
    """Class centroids c_k = sum_k / N_k (paper Eq. 6), (K, D).

    A class with no clip (N_k = 0: the split has none) keeps its ``previous`` prototype, or the zero
    vector when there is none; the official code would produce NaN there.
    """
    if sums.dim() != 2 or counts.shape != sums.shape[:1]:
        raise ValueError(f"sums must be (K, D) and counts (K,), got {tuple(sums.shape)} and {tuple(counts.shape)}")
    means = sums / counts.clamp_min(1).unsqueeze(1)
    empty = (counts == 0).unsqueeze(1)
    fallback = previous.to(means) if previous is not None else torch.zeros_like(means)
    return torch.where(empty, fallback, means)


@torch.no_grad()
def momentum_prototypes(new: Tensor, old: Tensor, momentum: float) -> Tensor:
    """c = (1 - eps) * c_new + eps * c_old (paper Eq. 12; official
    ``(1 - args.momentum_coef) * prototypes + args.momentum_coef * a_proto``)."""
    if not 0 <= momentum < 1:
        raise ValueError(f"momentum must be in [0, 1), got {momentum!r}")
    if new.shape != old.shape:
        raise ValueError(f"new and old prototypes differ in shape: {tuple(new.shape)} vs {tuple(old.shape)}")
    return (1 - momentum) * new + momentum * old.to(new)


def prototype_logits(features: Tensor, prototypes: Tensor) -> Tensor:
    """-d(z_i, c_k), the Euclidean distances to the prototypes, negated: (B, D), (K, D) -> (B, K).

    The softmax of these is the prototype classifier's distribution (paper Eq. 7; official
    ``audio_sim = -EU_dist(a, audio_proto)``, ``EU_dist`` = sqrt of the dot product of the
    difference). Gradient reaches ``features`` only: prototypes are detached (Algorithm 1).
    Computed in float32, by differences (no ``|x|^2 - 2xy + |y|^2`` cancellation).
    """
    _check_features(features)
    if prototypes.dim() != 2 or prototypes.shape[1] != features.shape[1]:
        raise ValueError(f"prototypes must be (K, {features.shape[1]}), got {tuple(prototypes.shape)}")
    return -torch.cdist(features.float(), prototypes.detach().float(), compute_mode="donot_use_mm_for_euclid_dist")


def prototypical_cross_entropy(logits: Tensor, labels: Tensor) -> Tensor:
    """L_PCE = mean_i -log softmax(-d(z_i, c))_{y_i} (paper Eq. 9; official
    ``criterion(audio_sim, label)`` with ``nn.CrossEntropyLoss``). ``logits``: (B, K) from
    :func:`prototype_logits`."""
    return F.cross_entropy(logits, labels)


def prototype_entropy(logits: Tensor) -> Tensor:
    """H(pi(-d(z, c))): the entropy (nats) of the prototype distribution, averaged over the batch
    (paper Eq. 13, where pi is the softmax). ``logits``: (B, K) -> 0-d."""
    log_p = F.log_softmax(logits.float(), dim=1)
    return -(log_p.exp() * log_p).sum(dim=1).mean()


@torch.no_grad()
def prototype_scores(logits_audio: Tensor, logits_visual: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
    """(s_a, s_v) = sum over the batch of p(y_i | z_i) under each modality's prototype classifier:
    the numerator and denominator of Eq. 8 (official ``score_a_p = sum_i softmax(audio_sim)[i][label[i]]``).
    Sum them over DDP ranks before :func:`pmr_coefficients_from_scores` for the global batch."""
    if logits_audio.shape != logits_visual.shape or logits_audio.shape[:1] != labels.shape:
        raise ValueError(f"logits must both be (B, K) with labels (B,), got {tuple(logits_audio.shape)}, "
                         f"{tuple(logits_visual.shape)}, {tuple(labels.shape)}")
    index = labels.long().unsqueeze(1)
    s_a = logits_audio.float().softmax(dim=1).gather(1, index).sum()
    s_v = logits_visual.float().softmax(dim=1).gather(1, index).sum()
    return s_a, s_v


@torch.no_grad()
def pmr_coefficients_from_scores(score_audio: Tensor, score_visual: Tensor,
                                 rule: Literal["indicator", "clipped_ratio"] = "indicator") -> PMRCoefficients:
    """The imbalance ratio rho = s_a / s_v (Eq. 8) and the coefficients beta (audio), gamma (visual).

    * ``"indicator"`` (official ``train_epoch``): rho > 1 -> beta = 0, gamma = 1; rho < 1 -> beta = 1,
      gamma = 0; rho == 1 -> both 0.
    * ``"clipped_ratio"`` (paper Eq. 11): rho < 1 -> beta = clip(0, 1/rho - 1, 1), gamma = 0;
      rho >= 1 -> beta = 0, gamma = clip(0, rho - 1, 1) (0 at rho == 1, like the official tie).

    Scores are floored at the smallest positive float so an underflowed softmax cannot give NaN.
    """
    if rule not in COEFFICIENT_RULES:
        raise ValueError(f"rule must be one of {COEFFICIENT_RULES}, got {rule!r}")
    tiny = torch.finfo(torch.float32).tiny
    s_a = score_audio.float().clamp_min(tiny)
    s_v = score_visual.float().clamp_min(tiny)
    ratio = s_a / s_v
    zero = torch.zeros_like(ratio)
    if rule == "indicator":
        beta = (ratio < 1).to(ratio.dtype)
        gamma = (ratio > 1).to(ratio.dtype)
    else:
        beta = torch.where(ratio < 1, (1 / ratio - 1).clamp(0, 1), zero)
        gamma = torch.where(ratio >= 1, (ratio - 1).clamp(0, 1), zero)
    return PMRCoefficients(ratio_av=ratio, accel_audio=beta, accel_visual=gamma)


def pmr_loss(base_loss: Tensor, pce_audio: Tensor, pce_visual: Tensor, entropy_audio: Tensor,
             entropy_visual: Tensor, coeffs: PMRCoefficients, pce_weight: float, entropy_weight: float,
             entropy_on: bool) -> Tensor:
    """L_final = L_CE + alpha*beta*L_PCE^a + alpha*gamma*L_PCE^v            (Eq. 10, official ``loss``)
                       - mu*gamma*H^a - mu*beta*H^v   while ``entropy_on`` (Eq. 13, epochs e < E_r).

    The entropy terms cross over (gamma on audio, beta on visual): the modality that is accelerated
    by its PCE is the slow one, and the *other*, dominant one has its prototype distribution pushed
    towards higher entropy, slowing its convergence.
    """
    loss = base_loss + pce_weight * (coeffs.accel_audio * pce_audio + coeffs.accel_visual * pce_visual)
    if entropy_on:
        loss = loss - entropy_weight * (coeffs.accel_visual * entropy_audio + coeffs.accel_audio * entropy_visual)
    return loss
