"""Gradient-Blending (Wang et al., CVPR 2020): a weighted sum of the audio, visual and joint heads'
losses, the weights ``w_k ∝ ΔG_k / ΔO_k²`` (``models/gblend.py``) estimated offline by a sweep stage
or online every super-epoch (Alg. 2)."""
from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from workers.methods.base import Method, MethodSection, StrictModel, lazy_module, register_method

torch = lazy_module("torch")
models = lazy_module("models")

HEADS = ("audio", "visual", "joint")


class GBlendWeights(StrictModel):
    audio: float = Field(ge=0)
    visual: float = Field(ge=0)
    joint: float = Field(ge=0)

    @model_validator(mode="after")
    def _positive_sum(self) -> "GBlendWeights":
        if self.audio + self.visual + self.joint <= 0:
            raise ValueError("method.weights must not all be zero")
        return self


class GBlendSection(MethodSection):
    """offline: weights estimated once from short runs of `estimate_epochs` and `+ estimate_window_epochs`
    (the sweep's estimation stage) or given explicitly; online: re-estimated inside the trial
    every super-epoch of `estimate_window_epochs` epochs."""

    name: Literal["gblend"] = "gblend"
    mode: Literal["offline", "online"] = "offline"
    weights: Literal["estimate", "uniform"] | GBlendWeights = Field("estimate", description=(
        "estimate: offline, by the estimation stage `avtune sweep` runs first (a single training refuses "
        "it); uniform: 1/3 each; or {audio, visual, joint}; online mode starts from these and re-estimates"))
    weights_source: Literal["spec", "estimation_stage", "estimation_fallback"] = Field("spec", description=(
        "where explicit weights came from: written in the spec, filled in by a sweep's estimation stage, or "
        "the stage's uniform fallback when no window let every head generalise (announced)"))
    estimate_epochs: int = Field(2, ge=1, description="N: epochs before the first measurement")
    estimate_window_epochs: int = Field(2, ge=1, description="n: epochs between the two measurements")


@register_method
class GBlend(Method):
    Section = GBlendSection
    run_param_keys = ("gblend_weights_source",)

    @classmethod
    def needs_estimation(cls, section: GBlendSection) -> bool:
        return section.mode == "offline" and section.weights == "estimate"

    @classmethod
    def run_params(cls, spec) -> dict[str, str]:
        m = spec.method
        if isinstance(m.weights, GBlendWeights):
            source = {"estimation_stage": "estimated", "estimation_fallback": "uniform_fallback"}.get(m.weights_source, "given")
        else:
            source = "uniform"  # "uniform", or online "estimate": uniform until the first online estimate
        if m.mode == "online":
            source += "+online"
        return {"gblend_weights_source": source}

    @classmethod
    def epoch_metrics(cls, spec) -> frozenset[str]:
        names = super().epoch_metrics(spec) | {f"gblend_w_{h}" for h in HEADS}
        if spec.method.mode == "online" and spec.method.estimate_window_epochs == 1:
            # Online G-Blend measures the training split's loss at every super-epoch's end: every epoch here.
            names |= {"loss_train_eval", "loss_train_eval_audio", "loss_train_eval_visual"}
        return names

    def build_model(self, num_classes: int):
        m = self.spec.model
        return models.build_gblend_classifier(num_classes, audio_arch=m.audio_arch, visual_arch=m.visual_arch,
                                              width=m.width)

    def setup(self, model, datasets) -> None:
        super().setup(model, datasets)
        given = self.config.weights
        if self.needs_estimation(self.config):
            # Never train on silently uniform weights when the spec asked for estimated ones.
            raise ValueError("method.weights: 'estimate' (offline) needs the estimation stage that `avtune sweep` "
                             "runs first; give weights {audio, visual, joint} or 'uniform', or use mode 'online'")
        if isinstance(given, GBlendWeights):
            total = given.audio + given.visual + given.joint
            self.weights = {h: getattr(given, h) / total for h in HEADS}
        else:
            self.weights = {h: 1 / 3 for h in HEADS}
        self.measurements: list[dict[str, tuple[float, float]]] = []

    def loss(self, out, batch, sums):
        F = torch.nn.functional
        with torch.no_grad():
            for head, logits in (("audio", out.logits_audio), ("visual", out.logits_visual), ("joint", out.logits)):
                sums[f"loss_train_{head}"] += F.cross_entropy(logits.float(), batch.labels)
        return models.blended_loss(out, batch.labels, self.weights)

    def measures(self, epoch: int) -> bool:
        """Online: the last epoch of a super-epoch, where Alg. 2 measures the heads' losses."""
        return self.config.mode == "online" and (epoch + 1) % self.config.estimate_window_epochs == 0

    def start_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def evaluate(self, loaders, autocast) -> dict[str, float]:
        metrics = super().evaluate(loaders, autocast)
        if self.measures(self.epoch) and "loss_train_eval" not in metrics:
            metrics.update(self.train_split_losses(loaders, autocast))
        return metrics

    def end_epoch(self, epoch: int, metrics: dict[str, float]) -> None:
        if self.measures(epoch):
            # Online G-Blend (Wang et al., Alg. 2): re-estimate at the end of every super-epoch from this
            # and the previous super-epoch's losses of each head: L^T of the model at the end of the
            # super-epoch on the training split (Sec. 3.2's overfitting term), L^V on the validation split.
            suffix = {"audio": "_audio", "visual": "_visual", "joint": ""}
            per_head = {h: (metrics[f"loss_train_eval{s}"], metrics[f"loss{s}"]) for h, s in suffix.items()}
            self.measurements = (self.measurements + [per_head])[-2:]
            if len(self.measurements) == 2:
                self.weights = models.estimate_blend_weights(*self.measurements)
        metrics.update({f"gblend_w_{h}": w for h, w in self.weights.items()})

    def state_dict(self):
        return {"weights": self.weights, "measurements": self.measurements}

    def load_state_dict(self, state) -> None:
        self.weights, self.measurements = state["weights"], state["measurements"]
