"""MLA: Multimodal Learning with Alternating Unimodal Adaptation.

Zhang, Yoon, Bansal, Yao, "Multimodal Representation Learning by Alternating Unimodal Adaptation",
CVPR 2024. Follows the official code, github.com/Cecile-hi/Multimodal-Learning-with-Alternating-
Unimodal-Adaptation (HEAD ab6c184): ``main.py`` (``train_epoch`` / ``valid`` with ``--gs_flag
--dynamic``, ``calculate_entropy``, ``calculate_gating_weights``) and ``utils/utils.py``
(``GSPlugin.before_update``). Pure PyTorch: no Ray, no MLflow.

The three parts, per training batch and at evaluation::

    for m in (audio, visual):                         # alternating uni-modal steps, one optimiser step each
        z_m = encoder_m(x_m); loss_m = CE(head(z_m), y); loss_m.backward()
        if not the very first step of the run:        # official `train_exp_counter != 0`
            P = update_projector(P, mean_b z_m, owm_alpha(step, steps_per_epoch))
            head.weight.grad = project_head_gradient(head.weight.grad, P)
        optimizer.step()
    eval: logits = w_a * head(z_a) + w_v * head(z_v), (w_a, w_v) = entropy_fusion_weights(...)

``head`` is ONE linear layer shared by both modalities (official ``ConcatFusion(input_dim=512)``'s
``fc_out`` under ``--gs_flag``, applied to each modality's 512-d feature alone), ``P`` one running
D x D projector shared by both modalities (official ``GSPlugin.Pl``, ``eye(512)`` at the start).
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .av_classifier import ogm_ge_weight_init
from .encoders import build_audio_encoder, build_visual_encoder
from .outputs import AVOutput

__all__ = [
    "ENTROPY_SCOPES",
    "PROJECTOR_UPDATES",
    "MLAClassifier",
    "build_mla_classifier",
    "entropy_fusion_weights",
    "fuse_logits",
    "owm_alpha",
    "prediction_entropy",
    "project_head_gradient",
    "update_projector",
]

ENTROPY_SCOPES = ("batch", "clip")
PROJECTOR_UPDATES = ("official", "owm")
EntropyScope = Literal["batch", "clip"]
ProjectorUpdate = Literal["official", "owm"]


# ---- test-time uncertainty-based fusion -------------------------------------------------------


def prediction_entropy(logits: Tensor, scope: EntropyScope = "batch") -> Tensor:
    """Entropy of one modality's prediction.

    ``scope="batch"`` is official ``main.py`` ``calculate_entropy`` exactly: ``softmax(output,
    dim=0)`` (over the *batch*, per class column) and ``-sum(p * log p)`` over every element, one
    0-d entropy for the whole (B, K) batch. ``scope="clip"`` is the per-clip reading (softmax over
    classes, one entropy per clip, as BalanceMM's ``BaseClassifierMLAModel.calculate_entropy`` and the
    line official ``main.py`` leaves commented out, ``softmax(output, dim=1)``).

    ``p * log_softmax`` replaces the official ``p * log(softmax)``: equal wherever the official value is
    finite; where a probability underflows to 0 the official term is ``0 * -inf = nan``, here 0.

    Args:
        logits: (B, K).

    Returns:
        () for ``"batch"``, (B,) for ``"clip"``; float32.
    """
    if logits.dim() != 2:
        raise ValueError(f"logits must be (B, K), got {tuple(logits.shape)}")
    if scope not in ENTROPY_SCOPES:
        raise ValueError(f"scope must be one of {ENTROPY_SCOPES}, got {scope!r}")
    dim = 0 if scope == "batch" else 1
    log_p = F.log_softmax(logits.float(), dim=dim)
    plogp = log_p.exp() * log_p
    return -plogp.sum() if scope == "batch" else -plogp.sum(dim=1)


def entropy_fusion_weights(logits_audio: Tensor, logits_visual: Tensor,
                           scope: EntropyScope = "batch") -> tuple[Tensor, Tensor]:
    """Fusion weights from the two modalities' prediction entropies (official ``main.py``
    ``calculate_gating_weights``; the paper's test-time uncertainty-based fusion)::

        e_max = max(e_a, e_v);  g_m = exp(e_max - e_m);  w_m = g_m / (g_a + g_v)

    i.e. ``w_m = softmax_m(-e_m)``: the more certain (lower-entropy) modality weighs more.

    Args:
        logits_audio, logits_visual: (B, K).
        scope: see :func:`prediction_entropy`.

    Returns:
        ``(w_audio, w_visual)``: 0-d tensors (``"batch"``) or (B,) (``"clip"``), ``w_a + w_v = 1``.
    """
    if logits_audio.shape != logits_visual.shape:
        raise ValueError(f"logits_audio {tuple(logits_audio.shape)} and logits_visual "
                         f"{tuple(logits_visual.shape)} must have the same shape (B, K)")
    e_a = prediction_entropy(logits_audio, scope)
    e_v = prediction_entropy(logits_visual, scope)
    e_max = torch.maximum(e_a, e_v)
    g_a, g_v = torch.exp(e_max - e_a), torch.exp(e_max - e_v)
    total = g_a + g_v
    return g_a / total, g_v / total


def fuse_logits(logits_audio: Tensor, logits_visual: Tensor, w_audio: Tensor, w_visual: Tensor) -> Tensor:
    """``out = out_a * w_a + out_v * w_v`` (official ``valid``, ``--dynamic``), with 0-d weights or
    per-clip (B,) weights broadcast over the K classes. Returns (B, K) float32 (also under autocast:
    a bf16 round of the fused logits could flip an argmax)."""
    if w_audio.dim() == 1:
        w_audio, w_visual = w_audio[:, None], w_visual[:, None]
    return logits_audio.float() * w_audio + logits_visual.float() * w_visual


# ---- head gradient modification (OWM-style projector) -----------------------------------------


def owm_alpha(step: int, steps_per_epoch: int) -> float:
    """The projector's regulariser at batch ``step`` of an epoch of ``steps_per_epoch`` batches:
    official ``GSPlugin.before_update``: ``lamda = batch_index / len_dataloader + 1``,
    ``alpha = 1.0 * 0.1 ** lamda``, so alpha falls from 0.1 (first batch) towards 0.01 (last) in
    every epoch."""
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise ValueError(f"step must be a non-negative int, got {step!r}")
    if isinstance(steps_per_epoch, bool) or not isinstance(steps_per_epoch, int) or steps_per_epoch < 1:
        raise ValueError(f"steps_per_epoch must be a positive int, got {steps_per_epoch!r}")
    return 1.0 * 0.1 ** (step / steps_per_epoch + 1)


@torch.no_grad()
def update_projector(projector: Tensor, feature_mean: Tensor, alpha: float,
                     rule: ProjectorUpdate = "official") -> Tensor:
    """One recursive update of the running projector, then its Frobenius normalisation.

    Official ``GSPlugin.before_update`` (``r``: the batch-mean feature as a row)::

        r = mean(z, 0, keepdim)            # (1, D)
        k = P @ r.T                        # (D, 1)
        P = P - (k @ k.T) / (alpha + k @ r)
        P = P / ||P||_F

    ``rule="official"`` keeps the official denominator ``alpha + k @ r``: (D, 1) @ (1, D) is a D x D
    outer product, so the division is element-wise, ``k_i k_j / (alpha + k_i r_j)``. ``rule="owm"``
    uses the orthogonal-weight-modification recursion it transcribes (Zeng et al., Nat. Mach. Intell.
    2019; official OWM code ``alpha + torch.mm(r, k)``): the scalar ``alpha + r @ k = alpha + r P r^T``,
    i.e. ``P - P r^T r P / (alpha + r P r^T)`` (P symmetric). Both normalise by the Frobenius norm
    (``Pl / torch.norm(Pl, p='fro')``).

    Args:
        projector: (D, D) float tensor P.
        feature_mean: (D,) the batch-mean feature r of the modality being trained (detached).
        alpha: from :func:`owm_alpha`.
        rule: "official" or "owm".

    Returns:
        The new (D, D) projector (a new tensor; ``projector`` is not modified).
    """
    if rule not in PROJECTOR_UPDATES:
        raise ValueError(f"rule must be one of {PROJECTOR_UPDATES}, got {rule!r}")
    d = projector.shape[0]
    if projector.shape != (d, d) or feature_mean.shape != (d,):
        raise ValueError(f"projector must be (D, D) and feature_mean (D,), got {tuple(projector.shape)} "
                         f"and {tuple(feature_mean.shape)}")
    p = projector.float()
    r = feature_mean.float().reshape(1, d)
    k = p @ r.t()  # (D, 1)
    denominator = alpha + (k @ r if rule == "official" else r @ k)  # (D, D) official, (1, 1) OWM
    p = p - (k @ k.t()) / denominator
    return p / torch.linalg.matrix_norm(p, ord="fro")


@torch.no_grad()
def project_head_gradient(grad: Tensor, projector: Tensor) -> Tensor:
    """The shared head's weight gradient after the modification: official ``GSPlugin.before_update``
    ``w.grad.data = torch.mm(w.grad.data, torch.t(Pl))``, i.e. ``grad @ P^T`` (the paper's head gradient modification).
    Only the weight (K, D) is projected; the bias gradient is left alone, as in the official code.

    Args:
        grad: (K, D) gradient of the head's weight.
        projector: (D, D).

    Returns:
        (K, D) in ``grad``'s dtype.
    """
    if grad.dim() != 2 or projector.shape != (grad.shape[1], grad.shape[1]):
        raise ValueError(f"grad must be (K, D) and projector (D, D), got {tuple(grad.shape)} and {tuple(projector.shape)}")
    return (grad.float() @ projector.float().t()).to(grad.dtype)


# ---- the model ---------------------------------------------------------------------------------


class MLAClassifier(nn.Module):
    """Audio encoder + visual encoder + ONE linear head shared by both modalities.

    * Training (the method's ``train_step``): :meth:`unimodal` runs one modality's encoder and the
      shared head: ``(features (B, D), logits (B, K))``.
    * ``forward(audio (B, 1, T, F), visual (B, 3, T, H, W)) -> AVOutput`` with ``logits_audio =
      head(z_a)``, ``logits_visual = head(z_v)`` and ``logits`` their entropy-weighted fusion
      (:func:`entropy_fusion_weights`, official ``valid`` with ``--gs_flag --dynamic``): the joint
      prediction of every evaluation. :meth:`forward_with_weights` also returns the weights.

    Both encoders must have the same ``out_dim`` (one head reads both); the head is initialised as
    official ``utils.weight_init`` (Xavier-normal weight, zero bias).
    """

    has_probe_heads = False

    def __init__(self, audio_encoder: nn.Module, visual_encoder: nn.Module, num_classes: int,
                 entropy_scope: EntropyScope = "batch") -> None:
        super().__init__()
        if audio_encoder.out_dim != visual_encoder.out_dim:
            raise ValueError(f"a shared head needs equal feature widths: audio out_dim {audio_encoder.out_dim}, "
                             f"visual out_dim {visual_encoder.out_dim}")
        if entropy_scope not in ENTROPY_SCOPES:
            raise ValueError(f"entropy_scope must be one of {ENTROPY_SCOPES}, got {entropy_scope!r}")
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2:
            raise ValueError(f"num_classes must be an int >= 2, got {num_classes!r}")
        self.audio_encoder = audio_encoder
        self.visual_encoder = visual_encoder
        self.head = nn.Linear(audio_encoder.out_dim, num_classes)
        self.head.apply(ogm_ge_weight_init)
        self.entropy_scope = entropy_scope

    @property
    def feature_dim(self) -> int:
        return self.head.in_features

    def unimodal(self, modality: str, x: Tensor) -> tuple[Tensor, Tensor]:
        """``modality``'s features (B, D) and shared-head logits (B, K)."""
        if modality == "audio":
            z = self.audio_encoder(x)
        elif modality == "visual":
            z = self.visual_encoder(x)
        else:
            raise ValueError(f"modality must be 'audio' or 'visual', got {modality!r}")
        return z, self.head(z)

    def forward_with_weights(self, audio: Tensor, visual: Tensor) -> tuple[AVOutput, Tensor, Tensor]:
        _, logits_audio = self.unimodal("audio", audio)
        _, logits_visual = self.unimodal("visual", visual)
        # Official `valid` runs under no_grad; the weights are never trained through.
        w_audio, w_visual = entropy_fusion_weights(logits_audio.detach(), logits_visual.detach(), self.entropy_scope)
        logits = fuse_logits(logits_audio, logits_visual, w_audio, w_visual)
        return AVOutput(logits, logits_audio, logits_visual), w_audio, w_visual

    def forward(self, audio: Tensor, visual: Tensor) -> AVOutput:
        return self.forward_with_weights(audio, visual)[0]


def build_mla_classifier(num_classes: int, audio_arch: str = "resnet18", visual_arch: str = "resnet18",
                         width: int = 64, entropy_scope: EntropyScope = "batch") -> MLAClassifier:
    """MLA's model: the encoders of :func:`models.build_av_classifier` and a shared (8 * width) -> K head
    (official: ResNet-18 encoders, 512-d features, ``fc_out = Linear(512, n_classes)``)."""
    return MLAClassifier(build_audio_encoder(audio_arch, width), build_visual_encoder(visual_arch, width),
                         num_classes, entropy_scope)
