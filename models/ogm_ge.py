"""On-the-fly Gradient Modulation with Generalization Enhancement (OGM-GE).

Peng, Wei, Deng, Wang, Hu, "Balanced Multimodal Learning via On-the-fly Gradient Modulation",
CVPR 2022. Follows the official OGM-GE_CVPR2022/main.py, ``train_epoch`` (HEAD, commit 9119343).

Training-step order, as in the official loop::

    out = model(audio, visual); loss = CE(out.logits, y); loss.backward()
    coeffs = ogm_coefficients(out.logits_audio, out.logits_visual, y, alpha)
    if in_modulation_window(epoch, starts, ends):
        modulate_gradients(model.audio_encoder, model.visual_encoder, coeffs, gaussian_enhance)
    optimizer.step()

Distributed training: ``modulate_gradients`` runs after DDP has averaged the gradients, so every
rank must use identical coefficients and identical noise or the replicas drift apart.
All-reduce (sum) the two scores from :func:`modality_scores` and call
:func:`ogm_coefficients_from_scores`; that also reproduces the official code, whose
``DataParallel`` computes the scores over the global batch. Seed the ``generator`` identically
on every rank.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor, nn

__all__ = [
    "OGMCoefficients",
    "in_modulation_window",
    "modality_scores",
    "modulate_gradients",
    "ogm_coefficients",
    "ogm_coefficients_from_scores",
]


class OGMCoefficients(NamedTuple):
    """Modulation coefficients for one training step (0-d tensors).

    Attributes:
        k_audio: multiplier for the audio encoder's conv-weight gradients, in (0, 1].
        k_visual: multiplier for the visual encoder's conv-weight gradients, in (0, 1].
        ratio_av: s_a / s_v, the audio-to-visual score discrepancy (official ``ratio_a``;
            ``1 / ratio_av`` is the official ``ratio_v`` that main.py logs as "ratio v").
    """

    k_audio: Tensor
    k_visual: Tensor
    ratio_av: Tensor


def _check_logits(logits_audio: Tensor, logits_visual: Tensor, labels: Tensor) -> None:
    if logits_audio is None or logits_visual is None:
        raise ValueError("logits_audio and logits_visual must both be tensors (got None); OGM-GE needs both modalities")
    if logits_audio.dim() != 2 or logits_audio.shape != logits_visual.shape:
        raise ValueError(
            "logits_audio and logits_visual must both be (B, K), got "
            f"{tuple(logits_audio.shape)} and {tuple(logits_visual.shape)}"
        )
    if labels.shape != logits_audio.shape[:1]:
        raise ValueError(f"labels must be (B,) = ({logits_audio.shape[0]},), got {tuple(labels.shape)}")


@torch.no_grad()
def modality_scores(logits_audio: Tensor, logits_visual: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
    """Per-modality confidence scores summed over the batch (paper Eq. 8-9; official main.py
    ``score_a/score_v = sum_i softmax(out_u)[i][label[i]]``), vectorised.

    Args:
        logits_audio, logits_visual: (B, K).
        labels: (B,) int64 class indices.

    Returns:
        ``(s_a, s_v)``, 0-d tensors.
    """
    _check_logits(logits_audio, logits_visual, labels)
    index = labels.long().unsqueeze(1)
    s_a = logits_audio.float().softmax(dim=1).gather(1, index).sum()
    s_v = logits_visual.float().softmax(dim=1).gather(1, index).sum()
    return s_a, s_v


@torch.no_grad()
def ogm_coefficients_from_scores(score_audio: Tensor, score_visual: Tensor, alpha: float) -> OGMCoefficients:
    """Coefficients from (possibly all-reduced) scores, exactly as official main.py ``train_epoch``::

        ratio_v = s_v / s_a ; ratio_a = 1 / ratio_v
        if ratio_v > 1: k_v = 1 - tanh(alpha * relu(ratio_v)); k_a = 1
        else:           k_a = 1 - tanh(alpha * relu(ratio_a)); k_v = 1

    This is paper Eq. 10 (k_u = 1 - tanh(alpha * rho_u) if rho_u > 1 else 1); the relu is a no-op
    since the ratios are positive. One case departs from Eq. 10: on an exact tie (s_a == s_v,
    both ratios 1) the official code takes the ``else`` branch and damps audio with
    ``1 - tanh(alpha)``, whereas Eq. 10 would leave both at 1. We keep the official behaviour.
    (An early official version, commit 65b81b1, used ``1 - tanh(alpha * relu(rho - 1))`` for both
    modalities, continuous at rho = 1; HEAD replaced it with the above.)

    Scores are floored at the smallest positive float so that a fully underflowed softmax gives
    a tie instead of NaN gradients.
    """
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not alpha >= 0:
        raise ValueError(f"alpha must be a non-negative number, got {alpha!r}")
    tiny = torch.finfo(torch.float32).tiny
    s_a = score_audio.float().clamp_min(tiny)
    s_v = score_visual.float().clamp_min(tiny)
    ratio_v = s_v / s_a
    ratio_a = 1.0 / ratio_v
    one = torch.ones_like(ratio_v)
    visual_dominant = ratio_v > 1
    k_visual = torch.where(visual_dominant, 1 - torch.tanh(alpha * torch.relu(ratio_v)), one)
    k_audio = torch.where(visual_dominant, one, 1 - torch.tanh(alpha * torch.relu(ratio_a)))
    return OGMCoefficients(k_audio=k_audio, k_visual=k_visual, ratio_av=ratio_a)


@torch.no_grad()
def ogm_coefficients(logits_audio: Tensor, logits_visual: Tensor, labels: Tensor, alpha: float) -> OGMCoefficients:
    """OGM coefficients for one batch: :func:`modality_scores` then :func:`ogm_coefficients_from_scores`.

    Args:
        logits_audio, logits_visual: (B, K) per-modality logits (``AVOutput.logits_audio/_visual``).
        labels: (B,) class indices.
        alpha: OGM-GE's alpha (>= 0); 0 disables the damping (k = 1).
    """
    s_a, s_v = modality_scores(logits_audio, logits_visual, labels)
    return ogm_coefficients_from_scores(s_a, s_v, alpha)


def in_modulation_window(epoch: int, starts: int, ends: int, *, inclusive_end: bool = False) -> bool:
    """True when gradients are modulated at ``epoch`` (0-based): ``starts <= epoch < ends``.

    Official main.py is not half-open. HEAD (since commit 0f64793, 2022-06-29, marked
    "# bug fixed") uses ``if args.modulation_starts <= epoch <= args.modulation_ends``, which
    also modulates epoch ``ends``; pass ``inclusive_end=True`` to reproduce it. Before that fix
    (commits edee4a5 .. 2776c30) the test was inverted, ``if starts >= epoch >= ends:
    coeff = 1``, which for the defaults (0, 50) never fires, so modulation ran in every epoch.
    The default here is the half-open window [starts, ends) so that ``ends - starts`` epochs are
    modulated.
    """
    for name, value in (("epoch", epoch), ("starts", starts), ("ends", ends)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"{name} must be a non-negative int, got {value!r}")
    if starts > ends:
        raise ValueError(f"modulation window is empty: starts={starts} > ends={ends}")
    return starts <= epoch <= ends if inclusive_end else starts <= epoch < ends


def _conv_weights(module: nn.Module) -> list[nn.Parameter]:
    return [m.weight for m in module.modules() if isinstance(m, nn.modules.conv._ConvNd)]


def _conv_grads(module: nn.Module) -> list[Tensor]:
    return [w.grad for w in _conv_weights(module) if w.grad is not None]


@torch.no_grad()
def _modulate(grads: list[Tensor], k: Tensor) -> None:
    if grads:
        torch._foreach_mul_(grads, k.to(grads[0].dtype))


@torch.no_grad()
def _add_ge_noise(grads: list[Tensor], stds: list[Tensor], generator: torch.Generator | None) -> None:
    """grad += N(0, std + 1e-8) for each gradient, drawn as one flat block per dtype/device.

    One ``randn`` call for all conv weights instead of one per weight: the noise is the same
    i.i.d. Gaussian the official code draws per parameter, at a fraction of the per-call overhead
    (the draw itself is most of OGM-GE's extra cost; benchmarks/train_step.py).
    """
    if not grads:
        return
    sizes = [g.numel() for g in grads]
    flat = torch.randn(sum(sizes), generator=generator, device=grads[0].device, dtype=grads[0].dtype)
    noise = [n.view_as(g) for n, g in zip(flat.split(sizes), grads)]
    torch._foreach_mul_(noise, [s.to(g.dtype) + 1e-8 for s, g in zip(stds, grads)])
    torch._foreach_add_(grads, noise)


def modulate_gradients(
    audio_encoder: nn.Module,
    visual_encoder: nn.Module,
    coeffs: OGMCoefficients,
    gaussian_enhance: bool,
    generator: torch.Generator | None = None,
) -> None:
    """Apply OGM (and OGM-GE) to the encoders' gradients in place; call after ``backward()``.

    Each conv weight gradient ``g`` of the audio encoder becomes ``g * k_audio`` (OGM) or
    ``g * k_audio + N(0, std(g) + 1e-8)`` (OGM-GE, paper Sec. 3.3), likewise for visual with
    ``k_visual``. One of the two coefficients is 1 (see :func:`ogm_coefficients_from_scores`),
    but with ``gaussian_enhance`` both encoders still receive noise, as in the official code.

    Which parameters: official main.py modulates parameters of ``audio_net`` / ``visual_net``
    whose gradient is 4-D, i.e. exactly the Conv2d weights of its 2D ResNets (its convs have no
    bias; BatchNorm parameters, biases and the fusion head are left alone) - both the
    coefficient and the noise. We apply both to conv weights of any dimensionality (Conv1d/2d/3d,
    found by module type), so the 3D video encoders (5-D weights) are modulated too; conv biases,
    normalisation parameters and linear layers are untouched. Parameters whose ``.grad`` is None
    are skipped.

    Args:
        audio_encoder, visual_encoder: the encoder modules (may be wrapped; all sub-modules are visited).
        coeffs: from :func:`ogm_coefficients`.
        gaussian_enhance: True for OGM-GE, False for plain OGM.
        generator: RNG for the noise, on the gradients' device (None = global RNG).
    """
    grads_a, grads_v = _conv_grads(audio_encoder), _conv_grads(visual_encoder)
    # Official: grad * k + N(0, grad.std() + 1e-8), std taken on the *unscaled* gradient
    # (torch's default, unbiased). A 1-element gradient has no spread: std 0.
    stds = [g.std() if g.numel() > 1 else g.new_zeros(()) for g in grads_a + grads_v] if gaussian_enhance else []
    _modulate(grads_a, coeffs.k_audio)
    _modulate(grads_v, coeffs.k_visual)
    if gaussian_enhance:
        _add_ge_noise(grads_a + grads_v, stds, generator)
