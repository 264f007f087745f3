"""Adaptive Gradient Modulation (AGM).

Li, Li, Hu, Lei, Li, Zhou, "Boosting Multi-modal Model Performance with Adaptive Gradient
Modulation", ICCV 2023. Follows the official code, github.com/lihong2303/AGM_ICCV2023 (commit
5a65542; the same code as lihongcs/AGM): ``model/CREMAD_net.py`` (``GradMod``: the Shapley
module and its gradient hooks) and ``run/CREMAD_main.py`` (``train``: scores, ratios, running
averages, coefficients, gradient clipping), the audio-visual late-fusion setting.

One training step, as the official loop runs it::

    f_av = model(a, v)                                  # train mode, with gradients
    model.eval(); f_a = model(a, 0); f_v = model(0, v); model.train()   # masked passes, WITH gradients
    phi_a, phi_v = shapley_responses(f_av, f_v, f_a)    # mono-modal responses (B, K)
    s = mono_modal_scores(phi_a, phi_v, y)              # (2,) mean clamped cross-entropy
    c, r, r_bar = agm_coefficients(s, s_bar, strength, cap)   # with the running averages *before* this step
    s_bar = update_running_scores(s_bar, s, iteration)  # cumulative mean over all steps so far
    if modulated epoch: scale = c                       # otherwise the previous scale is kept
    loss = CE(modulated_output(phi_a, phi_v, scale), y); loss.backward()
    clip_when_exceeded(params, fusion output weights, threshold); optimizer.step()

How the coefficients act (official ``GradMod``): the fused output is ``phi_a + phi_v`` (which equals
``f_av``), and a backward hook multiplies the gradient reaching ``phi_a`` by ``c_a`` and the one
reaching ``phi_v`` by ``c_v``. The gradient then flows on through *all three* passes (the masked
passes are run with autograd, in eval mode), so this is **not** the same as scaling each encoder's
parameter gradients after backward: with ``phi_a = (f_av - f_v + f_a) / 2`` the joint pass receives
``(c_a + c_v) / 2`` of the gradient and the masked passes ``+-(c_a - c_v) / 2``. We reproduce the
hook structure exactly (:func:`scale_gradient`).

Distributed training: the scores are batch means; sum them over ranks with the sample count
(:func:`mono_modal_score_sums`) and divide, so every rank computes the same coefficients from the
global batch, as the official ``DataParallel`` run does.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import NamedTuple

import torch
from torch import Tensor, nn

__all__ = [
    "AGMStep",
    "SCORE_FLOOR",
    "agm_coefficients",
    "clip_when_exceeded",
    "discrepancy_ratios",
    "global_iteration",
    "modulated_output",
    "mono_modal_accuracy",
    "mono_modal_score_sums",
    "mono_modal_scores",
    "scale_gradient",
    "shapley_responses",
    "update_running_scores",
]

# Official CREMAD_main.py: a true-class probability below 1e-8 (or a -inf log) counts as 1e-8.
SCORE_FLOOR = 1e-8


def shapley_responses(joint: Tensor, audio_masked: Tensor, visual_masked: Tensor) -> tuple[Tensor, Tensor]:
    """Mono-modal responses of a two-modality model (paper Sec. 3.1, two-player Shapley values of
    the logits; official ``CREMAD_net.py`` ``Modality_Audio`` / ``Modality_Visual``)::

        phi_a = (f(a, v) - f(0, v) + f(a, 0)) / 2
        phi_v = (f(a, v) - f(a, 0) + f(0, v)) / 2

    The official modules leave out the empty coalition ``f(0, 0)`` (it computes ``zero_padding_out``
    but never uses it in AGM), so ``phi_a + phi_v = f(a, v)`` exactly.

    Args:
        joint: (B, K) logits of the full input, ``f(a, v)``.
        audio_masked: (B, K) logits with the audio input zeroed, ``f(0, v)`` (official ``pad_audio_out``).
        visual_masked: (B, K) logits with the visual input zeroed, ``f(a, 0)`` (official ``pad_visual_out``).

    Returns:
        ``(phi_a, phi_v)``, each (B, K), differentiable in all three inputs.
    """
    if not (joint.shape == audio_masked.shape == visual_masked.shape) or joint.dim() != 2:
        raise ValueError("joint, audio_masked and visual_masked must all be (B, K), got "
                         f"{tuple(joint.shape)}, {tuple(audio_masked.shape)}, {tuple(visual_masked.shape)}")
    phi_a = 0.5 * (joint - audio_masked + visual_masked)
    phi_v = 0.5 * (joint - visual_masked + audio_masked)
    return phi_a, phi_v


class _ScaleGradient(torch.autograd.Function):
    """Identity forward; backward multiplies the incoming gradient by ``scale``."""

    @staticmethod
    def forward(ctx, x: Tensor, scale: Tensor) -> Tensor:
        ctx.save_for_backward(scale)
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: Tensor):
        (scale,) = ctx.saved_tensors
        return grad * scale.to(grad.dtype), None


def scale_gradient(x: Tensor, scale: Tensor | float) -> Tensor:
    """``x`` unchanged forward, its gradient times ``scale`` backward: official ``GradMod``'s
    ``Modality_out`` identity modules with the full backward hooks ``hooka`` / ``hookv``
    (``return ginp[0].clone() * self.scale_a``)."""
    scale = torch.as_tensor(scale, device=x.device).detach()
    if scale.dim() != 0:
        raise ValueError(f"scale must be a scalar, got shape {tuple(scale.shape)}")
    return _ScaleGradient.apply(x, scale)


def modulated_output(phi_a: Tensor, phi_v: Tensor, scale_audio: Tensor | float, scale_visual: Tensor | float) -> Tensor:
    """The output AGM trains on: ``phi_a + phi_v`` (= ``f(a, v)``) with ``d/d phi_a`` scaled by
    ``scale_audio`` and ``d/d phi_v`` by ``scale_visual`` (official ``GradMod.forward`` returns
    ``m_a + m_v`` with ``m_a = m_a_o(...)``, ``m_v = m_v_o(...)``). (B, K) -> (B, K)."""
    return scale_gradient(phi_a, scale_audio) + scale_gradient(phi_v, scale_visual)


@torch.no_grad()
def mono_modal_score_sums(phi_a: Tensor, phi_v: Tensor, labels: Tensor) -> Tensor:
    """Summed per-sample scores, ready for an all-reduce: ``[sum_i s_a_i, sum_i s_v_i, B]`` (3,) float32.

    Per sample (official ``CREMAD_main.py`` ``train``): ``-log softmax(phi)[y]``, and where that
    probability is below 1e-8 (or its log is -inf) ``-log(1e-8)`` instead, i.e.
    ``-log(max(p_y, 1e-8))``. Computed in float32 from the softmax as the official code does.

    Args:
        phi_a, phi_v: (B, K) mono-modal responses.
        labels: (B,) class indices.
    """
    if phi_a.dim() != 2 or phi_a.shape != phi_v.shape:
        raise ValueError(f"phi_a and phi_v must both be (B, K), got {tuple(phi_a.shape)} and {tuple(phi_v.shape)}")
    if labels.shape != phi_a.shape[:1]:
        raise ValueError(f"labels must be (B,) = ({phi_a.shape[0]},), got {tuple(labels.shape)}")
    index = labels.long().unsqueeze(1)
    sums = [-phi.float().softmax(dim=1).gather(1, index).clamp_min(SCORE_FLOOR).log().sum() for phi in (phi_a, phi_v)]
    return torch.stack([*sums, torch.tensor(float(labels.numel()), device=phi_a.device)])


@torch.no_grad()
def mono_modal_scores(phi_a: Tensor, phi_v: Tensor, labels: Tensor) -> Tensor:
    """``[s_a, s_v]`` (2,) float64: the batch means of :func:`mono_modal_score_sums` (official
    ``score_audio = score_audio / out_a.size(0)``). Lower is better (a cross-entropy)."""
    sums = mono_modal_score_sums(phi_a, phi_v, labels).double()
    return sums[:2] / sums[2]


def discrepancy_ratios(scores: Tensor) -> Tensor:
    """``r_m = exp(M / (M - 1) * (mean(s) - s_m))`` for the (M,) scores (official ``AVMNIST_main.py``
    / ``URFunny_main.py`` write it so; for M = 2 it is ``CREMAD_main.py``'s
    ``ratio_a = exp(s_v - s_a)``, ``ratio_v = exp(s_a - s_v)``). ``r_m > 1``: modality m's loss is
    below the others', i.e. it currently leads."""
    if scores.dim() != 1 or scores.numel() < 2:
        raise ValueError(f"scores must be (M,) with M >= 2, got shape {tuple(scores.shape)}")
    m = scores.numel()
    return torch.exp(m / (m - 1) * (scores.mean() - scores))


class AGMStep(NamedTuple):
    """One step's AGM quantities, (M,) float64 tensors in modality order (audio, visual).

    Attributes:
        coefficients: ``c_m = exp(strength * min(r_bar_m - r_m, cap))`` (official ``coeff_a``, ``coeff_v``).
        ratios: ``r_m`` of this step's scores (official ``ratio_a``, ``ratio_v``).
        running_ratios: ``r_bar_m``, the same ratio of the running-average scores *before* this
            step's update (official ``optimal_ratio_a``, ``optimal_ratio_v``).
    """

    coefficients: Tensor
    ratios: Tensor
    running_ratios: Tensor


def agm_coefficients(scores: Tensor, running_scores: Tensor, strength: float, exponent_cap: float = 10.0) -> AGMStep:
    """Modulation coefficients (official ``CREMAD_main.py`` ``train``)::

        r_m     = discrepancy_ratios(s)[m]            # this step
        r_bar_m = discrepancy_ratios(s_bar)[m]        # running averages before this step
        c_m     = exp(strength * min(r_bar_m - r_m, exponent_cap))

    A modality that leads more now than on average (``r_m > r_bar_m``) gets ``c_m < 1``; one that
    lags gets ``c_m > 1``. ``exponent_cap`` is 10 in ``CREMAD_main.py`` (7 in ``URFunny_main.py``
    and BalanceMM; ``AVE_main.py`` has none); it bounds only the boost.

    Args:
        scores: (M,) this step's mono-modal scores.
        running_scores: (M,) running averages (zeros before the first step, as official).
        strength: the paper's alpha (official ``--alpha``), > 0.
        exponent_cap: upper bound on ``r_bar_m - r_m``.
    """
    if isinstance(strength, bool) or not isinstance(strength, (int, float)) or not strength >= 0:
        raise ValueError(f"strength must be a non-negative number, got {strength!r}")
    if scores.shape != running_scores.shape:
        raise ValueError(f"scores and running_scores must have the same shape, got {tuple(scores.shape)} "
                         f"and {tuple(running_scores.shape)}")
    scores, running_scores = scores.double(), running_scores.double().to(scores.device)
    ratios = discrepancy_ratios(scores)
    running_ratios = discrepancy_ratios(running_scores)
    coefficients = torch.exp(strength * torch.clamp(running_ratios - ratios, max=exponent_cap))
    return AGMStep(coefficients, ratios, running_ratios)


def update_running_scores(running_scores: Tensor, scores: Tensor, iteration: int) -> Tensor:
    """``s_bar <- s_bar * (t - 1) / t + s / t`` for the 1-based global ``iteration`` t: the mean of
    the scores of every step since training began, carried across epochs (official
    ``train_score_a = train_score_a * (iteration - 1) / iteration + score_audio.item() / iteration``;
    ``train`` returns it and the next epoch starts from it)."""
    if isinstance(iteration, bool) or not isinstance(iteration, int) or iteration < 1:
        raise ValueError(f"iteration must be a positive int (1-based), got {iteration!r}")
    return running_scores.double() * ((iteration - 1) / iteration) + scores.double() / iteration


def global_iteration(epoch: int, steps_per_epoch: int, step: int) -> int:
    """1-based step count since training began for 0-based ``epoch`` and ``step``: official
    ``iteration = (epoch - 1) * total_batch + step + 1`` with its 1-based epochs."""
    for name, value in (("epoch", epoch), ("step", step)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"{name} must be a non-negative int, got {value!r}")
    if isinstance(steps_per_epoch, bool) or not isinstance(steps_per_epoch, int) or steps_per_epoch < 1:
        raise ValueError(f"steps_per_epoch must be a positive int, got {steps_per_epoch!r}")
    return epoch * steps_per_epoch + step + 1


@torch.no_grad()
def clip_when_exceeded(params: Iterable[nn.Parameter], check: Sequence[nn.Parameter], threshold: float) -> Tensor:
    """Official ``CREMAD_main.py`` (AGM runs, after backward)::

        if fc_out.weight.grad.max() > t or fc_out.weight.grad.min() < -t:
            clip_grad_norm_(model.parameters(), max_norm=t)

    ``check``: the parameters whose gradients are tested (the fusion's output layer); ``params``:
    those clipped together. Without a host sync: the clip factor of ``clip_grad_norm_``,
    ``min(t / (||g|| + 1e-6), 1)``, is applied where the test holds and 1 elsewhere.

    Returns:
        0-d bool tensor, True where the gradients were clipped.
    """
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not threshold > 0:
        raise ValueError(f"threshold must be a positive number, got {threshold!r}")
    grads = [p.grad for p in params if p.grad is not None]
    tested = [p.grad for p in check if p.grad is not None]
    if not grads or not tested:
        return torch.zeros((), dtype=torch.bool)
    exceeded = torch.stack([g.detach().abs().max().float() for g in tested]).max() > threshold
    norms = [torch.linalg.vector_norm(g.detach(), 2.0) for g in grads]
    total = torch.linalg.vector_norm(torch.stack([n.to(grads[0].device) for n in norms]), 2.0)
    factor = torch.clamp(threshold / (total + 1e-6), max=1.0)
    factor = torch.where(exceeded.to(factor.device), factor, torch.ones_like(factor))
    for g in grads:
        g.mul_(factor.to(g.device, g.dtype))
    return exceeded


@torch.no_grad()
def mono_modal_accuracy(model: nn.Module, loader: Iterable, device: torch.device, autocast) -> dict[str, float]:
    """Accuracy of the mono-modal responses ``phi_a``, ``phi_v`` over a whole split, the per-modality
    accuracies official ``CREMAD_main.py`` ``test`` reports for AGM (all three passes in eval mode).

    Args:
        model: ``forward(audio, visual) -> AVOutput``; set to eval mode here.
        loader: yields ``(audio, visual, labels, index)``.
        autocast: a context-manager factory (``contextlib.nullcontext`` on CPU).

    Returns:
        ``{"agm_acc_audio": ..., "agm_acc_visual": ...}``.
    """
    model.eval()
    correct = torch.zeros(2, dtype=torch.float64)
    n = 0
    for audio, visual, labels, *_ in loader:
        audio, visual, labels = audio.to(device), visual.to(device), labels.to(device)
        with autocast():
            joint = model(audio, visual).logits
            visual_masked = model(audio, torch.zeros_like(visual)).logits
            audio_masked = model(torch.zeros_like(audio), visual).logits
        phis = shapley_responses(joint.float(), audio_masked.float(), visual_masked.float())
        correct += torch.stack([(phi.argmax(1) == labels).sum() for phi in phis]).double().cpu()
        n += labels.numel()
    acc = (correct / max(n, 1)).tolist()
    return {"agm_acc_audio": acc[0], "agm_acc_visual": acc[1]}
