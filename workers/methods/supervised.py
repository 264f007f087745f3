"""Plain supervised training: the joint model (``normal``) and the uni-modal baselines
(``audio_only``, ``visual_only``) that the report measures each modality's utilisation against."""
from __future__ import annotations

from typing import Literal

from workers.methods.base import Method, MethodSection, lazy_module, register_method

models = lazy_module("models")


class NormalSection(MethodSection):
    name: Literal["normal"] = "normal"


@register_method
class Normal(Method):
    """Joint audio-visual classifier trained with cross-entropy on the fused logits."""

    Section = NormalSection

    def build_model(self, num_classes: int):
        m = self.spec.model
        return models.build_av_classifier(num_classes, fusion=m.fusion, audio_arch=m.audio_arch,
                                          visual_arch=m.visual_arch, width=m.width)


class AudioOnlySection(MethodSection):
    name: Literal["audio_only"] = "audio_only"


class VisualOnlySection(MethodSection):
    name: Literal["visual_only"] = "visual_only"


class _Unimodal(Method):
    def build_model(self, num_classes: int):
        m = self.spec.model
        arch = m.audio_arch if self.modality == "audio" else m.visual_arch
        return models.build_unimodal_classifier(self.modality, num_classes, arch=arch, width=m.width)


@register_method
class AudioOnly(_Unimodal):
    """Audio encoder and classifier alone: the audio baseline."""

    Section = AudioOnlySection
    modality = "audio"


@register_method
class VisualOnly(_Unimodal):
    """Visual encoder and classifier alone: the visual baseline."""

    Section = VisualOnlySection
    modality = "visual"
