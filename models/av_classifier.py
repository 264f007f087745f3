"""Late-fusion audio-visual classifier (OGM-GE's ``AVClassifier``) and uni-modal baselines.

Follows OGM-GE_CVPR2022/models/basic_model.py (encoders, then a fusion head over
(audio, visual) features) and derives per-modality logits as OGM-GE_CVPR2022/main.py,
``train_epoch``, does, so that OGM-GE can measure each modality's confidence.
"""

from __future__ import annotations

from torch import Tensor, nn

from .encoders import build_audio_encoder, build_visual_encoder
from .fusion import ConcatFusion, SumFusion, build_fusion
from .outputs import AVOutput

# Fusions whose fused classifier has no per-modality logits: the model adds detached linear probe heads
# (their scores, not the official per-modality logits, then feed OGM's coefficients).
PROBE_HEAD_FUSIONS = ("film", "gated")

__all__ = [
    "AVClassifier",
    "UnimodalClassifier",
    "build_av_classifier",
    "build_unimodal_classifier",
    "ogm_ge_weight_init",
]


def ogm_ge_weight_init(m: nn.Module) -> None:
    """Per-module init of OGM-GE_CVPR2022/utils/utils.py ``weight_init`` (use with ``Module.apply``).

    Linear: Xavier-normal weight, zero bias. Conv/BatchNorm are already initialised the same
    way by :mod:`models.encoders`, so only Linear layers are touched here.
    """
    if isinstance(m, nn.Linear):
        nn.init.xavier_normal_(m.weight)
        nn.init.zeros_(m.bias)


class AVClassifier(nn.Module):
    """Audio encoder + visual encoder + fusion head.

    ``forward(audio (B, 1, T, F), visual (B, 3, T, H, W)) -> AVOutput`` with (B, K) logits.

    Per-modality logits:

    * ``sum``: ``logits_audio = a @ fc_x.weight.T + fc_x.bias`` (and likewise ``fc_y`` for
      visual), as in official main.py ``train_epoch`` (its ``valid`` adds ``bias / 2`` instead;
      we follow the training code that drives the OGM coefficients).
    * ``concat``: audio is the first half of the concatenated input (official
      ``torch.cat((x, y))`` with ``x = a``), so ``logits_audio = a @ W[:, :D_a].T + b / 2`` and
      ``logits_visual = v @ W[:, D_a:].T + b / 2`` (official ``train_epoch``).
      For both ``sum`` and ``concat``, ``logits == logits_audio + logits_visual``.
      These per-modality logits are not meant to be trained (official main.py never
      back-propagates ``loss_a``/``loss_v``); ``has_probe_heads`` is False.
    * ``film`` / ``gated``: the joint classifier does not decompose per modality (official
      main.py's weight-halving branch does not even type-check for them), so small linear probe
      heads read the *detached* encoder features. Their CE losses train only the probes and
      leave the encoders untouched; ``has_probe_heads`` is True to tell the training loop to
      add those losses.
    """

    def __init__(self, audio_encoder: nn.Module, visual_encoder: nn.Module, fusion_name: str, num_classes: int) -> None:
        super().__init__()
        self.audio_encoder = audio_encoder
        self.visual_encoder = visual_encoder
        self.fusion_name = fusion_name
        self.fusion = build_fusion(fusion_name, audio_encoder.out_dim, visual_encoder.out_dim, num_classes)
        self.has_probe_heads = fusion_name in PROBE_HEAD_FUSIONS
        if self.has_probe_heads:
            self.probe_audio = nn.Linear(audio_encoder.out_dim, num_classes)
            self.probe_visual = nn.Linear(visual_encoder.out_dim, num_classes)
        for module in (self.fusion, *((self.probe_audio, self.probe_visual) if self.has_probe_heads else ())):
            module.apply(ogm_ge_weight_init)

    def forward(self, audio: Tensor, visual: Tensor) -> AVOutput:
        a = self.audio_encoder(audio)
        v = self.visual_encoder(visual)
        _, _, logits = self.fusion(a, v)
        if self.has_probe_heads:
            return AVOutput(logits, self.probe_audio(a.detach()), self.probe_visual(v.detach()))
        if isinstance(self.fusion, SumFusion):
            return AVOutput(logits, self.fusion.fc_x(a), self.fusion.fc_y(v))
        if isinstance(self.fusion, ConcatFusion):
            weight, bias = self.fusion.fc_out.weight, self.fusion.fc_out.bias
            d_a = self.fusion.in_dim_x
            logits_audio = a @ weight[:, :d_a].t() + bias / 2
            logits_visual = v @ weight[:, d_a:].t() + bias / 2
            return AVOutput(logits, logits_audio, logits_visual)
        raise AssertionError(f"unhandled fusion {self.fusion_name!r}")  # build_fusion validated the name


def build_av_classifier(
    num_classes: int,
    fusion: str = "concat",
    audio_arch: str = "resnet18",
    visual_arch: str = "resnet18",
    width: int = 64,
) -> AVClassifier:
    """OGM-GE-style late-fusion classifier.

    Args:
        num_classes: K.
        fusion: "sum", "concat", "film" or "gated".
        audio_arch: see :func:`models.encoders.build_audio_encoder`.
        visual_arch: see :func:`models.encoders.build_visual_encoder`.
        width: first-stage channels of both encoders (64 = standard ResNet-18).
    """
    return AVClassifier(
        build_audio_encoder(audio_arch, width), build_visual_encoder(visual_arch, width), fusion, num_classes
    )


_MODALITIES = ("audio", "visual")


class UnimodalClassifier(nn.Module):
    """One encoder + linear head; the other modality's input is ignored (may be None).

    ``forward(audio, visual) -> AVOutput(logits=l, logits_audio=l or None, logits_visual=l or None)``
    with ``l`` (B, K) computed from ``audio`` (B, 1, T, F) or ``visual`` (B, 3, T, H, W).
    """

    def __init__(self, modality: str, encoder: nn.Module, num_classes: int) -> None:
        super().__init__()
        if modality not in _MODALITIES:
            raise ValueError(f"modality must be one of {_MODALITIES}, got {modality!r}")
        self.modality = modality
        self.audio_encoder = encoder if modality == "audio" else None
        self.visual_encoder = encoder if modality == "visual" else None
        self.head = nn.Linear(encoder.out_dim, num_classes)
        self.head.apply(ogm_ge_weight_init)
        self.has_probe_heads = False

    def forward(self, audio: Tensor | None, visual: Tensor | None) -> AVOutput:
        if self.audio_encoder is not None:
            if audio is None:
                raise ValueError("audio must be a tensor for an audio UnimodalClassifier, got None")
            logits = self.head(self.audio_encoder(audio))
            return AVOutput(logits, logits, None)
        if visual is None:
            raise ValueError("visual must be a tensor for a visual UnimodalClassifier, got None")
        logits = self.head(self.visual_encoder(visual))
        return AVOutput(logits, None, logits)


def build_unimodal_classifier(
    modality: str, num_classes: int, arch: str = "resnet18", width: int = 64
) -> UnimodalClassifier:
    """Uni-modal baseline: ``modality`` in {"audio", "visual"}; ``arch`` as for that modality's encoder."""
    if modality == "audio":
        encoder = build_audio_encoder(arch, width)
    elif modality == "visual":
        encoder = build_visual_encoder(arch, width)
    else:
        raise ValueError(f"modality must be one of {_MODALITIES}, got {modality!r}")
    return UnimodalClassifier(modality, encoder, num_classes)
