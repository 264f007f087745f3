"""OGM and OGM-GE (Peng et al., CVPR 2022): on-the-fly gradient modulation of the dominant modality's
encoder, with generalisation enhancement (Gaussian noise) for ``ogm_ge``. Formulas in ``models/ogm_ge.py``
follow official ``main.py`` (``train_epoch``)."""
from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from workers.methods.base import MethodSection, lazy_module, register_method
from workers.methods.supervised import Normal

torch = lazy_module("torch")
models = lazy_module("models")
distributed = lazy_module("workers.distributed")


class OGMSection(MethodSection):
    """OGM / OGM-GE. Modulation is active for the 0-based epochs in [modulation_starts, modulation_ends)."""

    name: Literal["ogm", "ogm_ge"] = "ogm_ge"
    alpha: float = Field(0.8, gt=0, le=10)
    modulation_starts: int = Field(0, ge=0, description="first modulated epoch (0-based)")
    modulation_ends: int = Field(50, ge=1, description=(
        "first epoch after the window: [starts, ends) is modulated. Official main.py modulates "
        "starts <= epoch <= ends, so its `--modulation_ends E` is `modulation_ends: E + 1` here"))

    @model_validator(mode="after")
    def _window(self) -> "OGMSection":
        if self.modulation_ends <= self.modulation_starts:
            raise ValueError(
                f"method.modulation_ends ({self.modulation_ends}) must be greater than "
                f"method.modulation_starts ({self.modulation_starts})"
            )
        return self


@register_method
class OGM(Normal):
    """The joint classifier of ``normal``; after backward, the dominant encoder's conv-weight
    gradients are scaled by ``k = 1 - tanh(alpha * rho)`` (Eq. 10) and, for OGM-GE, given noise."""

    Section = OGMSection
    label_fields = ("alpha", "modulation_starts", "modulation_ends")
    run_param_keys = ("ogm_scores_from",)

    @classmethod
    def run_label(cls, section: OGMSection) -> list[str]:
        return [f"a{section.alpha:g}", f"w{section.modulation_starts}-{section.modulation_ends}"]

    @classmethod
    def epoch_metrics(cls, spec) -> frozenset[str]:
        # The epoch means of the coefficients (after_backward), inside the modulation window or not.
        return super().epoch_metrics(spec) | {"k_audio", "k_visual", "ratio_av", "modulation_active"}

    @classmethod
    def run_params(cls, spec) -> dict[str, str]:
        # Official OGM-GE scores each modality with its own slice of the fused classifier (sum / concat);
        # FiLM and gated fusion have none, so avtune scores them with detached probe heads.
        probes = spec.model.fusion in models.PROBE_HEAD_FUSIONS
        return {"ogm_scores_from": "probe_heads" if probes else "fusion_logits"}

    @classmethod
    def spec_problems(cls, spec) -> list[str]:
        if spec.method.modulation_starts >= spec.train.epochs:
            return [f"method.modulation_starts ({spec.method.modulation_starts}) must be below "
                    f"train.epochs ({spec.train.epochs}): the modulation window would never open"]
        return []

    def start_epoch(self, epoch: int) -> None:
        self.modulate = models.in_modulation_window(epoch, self.config.modulation_starts, self.config.modulation_ends)

    def after_backward(self, out, batch, epoch: int, step: int, sums) -> None:
        # Scores are summed over the *global* batch (OGM-GE main.py sums over its batch), so every
        # rank computes the same coefficients and DDP replicas stay identical.
        scores = torch.stack(models.modality_scores(out.logits_audio.float(), out.logits_visual.float(), batch.labels))
        scores = distributed.all_reduce_sum(scores.detach())
        coeffs = models.ogm_coefficients_from_scores(scores[0], scores[1], self.config.alpha)
        if self.modulate:
            # Same seed on every rank: identical GE noise keeps replicas in sync.
            seed = self.spec.train.seed * 1_000_003 + epoch * 100_003 + step
            noise = torch.Generator(device=self.runtime.device).manual_seed(seed)
            models.modulate_gradients(self.model.audio_encoder, self.model.visual_encoder, coeffs,
                                      gaussian_enhance=self.config.name == "ogm_ge", generator=noise)
        sums["k_audio"] += coeffs.k_audio
        sums["k_visual"] += coeffs.k_visual
        sums["ratio_av"] += coeffs.ratio_av

    def end_epoch(self, epoch: int, metrics: dict[str, float]) -> None:
        metrics["modulation_active"] = float(self.modulate)
