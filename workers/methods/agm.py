"""AGM, adaptive gradient modulation (Li et al., ICCV 2023): Shapley mono-modal responses from masked
forward passes, their cross-entropy scores, the discrepancy ratio against its running average, and a
per-modality coefficient on the gradient of each response. Formulas in ``models/agm.py``, following
official ``run/CREMAD_main.py`` (``train``) and ``model/CREMAD_net.py`` (``GradMod``)."""
from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from workers.methods.base import MethodSection, lazy_module, register_method
from workers.methods.supervised import Normal

torch = lazy_module("torch")
models = lazy_module("models")
agm = lazy_module("models.agm")
distributed = lazy_module("workers.distributed")

MODALITIES = ("audio", "visual")


class AGMSection(MethodSection):
    """AGM. The coefficients are recomputed every step; inside the modulated epochs
    [modulation_first_epoch, modulation_end_epoch) they replace the gradient scales, outside it the
    scales stay as they were (1 before the window, the last coefficients after it), as official
    ``update_scale`` is only called inside its window while the hooks keep the last scales."""

    name: Literal["agm"] = "agm"
    modulation_strength: float = Field(1.0, gt=0, le=100, description=(
        "alpha in c^m = exp(alpha * min(r_bar^m - r^m, cap)) (paper's modulation strength, official "
        "--alpha; default 1.0 is the official default, the authors used 1.5 on CREMA-D)"))
    coefficient_exponent_cap: float = Field(10.0, gt=0, le=100, description=(
        "cap on r_bar^m - r^m inside the exponent: 10 in official run/CREMAD_main.py, 7 in "
        "URFunny_main.py and BalanceMM"))
    fusion_grad_clip: float | None = Field(1.0, gt=0, le=1000, description=(
        "t: when a gradient entry of the fusion's output layer leaves [-t, t], clip the gradient norm "
        "of the model to t (official CREMAD_main.py: 1.0; URFunny_main.py and BalanceMM: 5.0); null: never"))
    modulation_first_epoch: int = Field(0, ge=0, description="first modulated epoch (0-based)")
    modulation_end_epoch: int | None = Field(None, ge=1, description=(
        "first epoch after the modulated ones (exclusive); null: modulate to the end (the authors' "
        "setting: 'a continuous process of modulation'). Official --modulation_starts S "
        "--modulation_ends E on its 1-based epochs is modulation_first_epoch: max(S - 1, 0), "
        "modulation_end_epoch: E here"))

    @model_validator(mode="after")
    def _window(self) -> "AGMSection":
        if self.modulation_end_epoch is not None and self.modulation_end_epoch <= self.modulation_first_epoch:
            raise ValueError(f"method.modulation_end_epoch ({self.modulation_end_epoch}) must be greater than "
                             f"method.modulation_first_epoch ({self.modulation_first_epoch})")
        return self


@register_method
class AGM(Normal):
    """The joint classifier of ``normal`` trained through AGM's Shapley module: each step runs the
    model on the full input (train mode) and with audio / visual zeroed (eval mode, with gradients),
    forms ``phi_a, phi_v``, trains on ``phi_a + phi_v`` with their gradients scaled by the
    coefficients, and clips when the fusion's output-layer gradient leaves [-t, t].

    Departures, logged in ``run_params``: the clipping test reads the fusion's output layer, which
    is official ``fc_out`` for concat / FiLM / gated and both ``fc_x`` and ``fc_y`` for sum (the
    official code has concat only); probe heads (FiLM / gated, trained on detached features as in
    ``normal``) are left out of the clipped norm. Under DDP the scores are summed over ranks, which
    reproduces the official ``DataParallel`` global-batch scores.
    """

    Section = AGMSection
    label_fields = ("modulation_strength", "modulation_first_epoch", "modulation_end_epoch")
    run_param_keys = ("agm_clip_test",)

    @classmethod
    def run_label(cls, section: AGMSection) -> list[str]:
        parts = [f"str{section.modulation_strength:g}"]  # "s<n>" would read as a seed
        if section.modulation_first_epoch or section.modulation_end_epoch is not None:
            end = "end" if section.modulation_end_epoch is None else section.modulation_end_epoch
            parts.append(f"w{section.modulation_first_epoch}-{end}")
        return parts

    @classmethod
    def run_params(cls, spec) -> dict[str, str]:
        if spec.method.fusion_grad_clip is None:
            return {"agm_clip_test": "off"}
        return {"agm_clip_test": "+".join(f"fusion.{name}.weight" for name in _output_layer_names(spec.model.fusion))}

    @classmethod
    def spec_problems(cls, spec) -> list[str]:
        if spec.method.modulation_first_epoch >= spec.train.epochs:
            return [f"method.modulation_first_epoch ({spec.method.modulation_first_epoch}) must be below "
                    f"train.epochs ({spec.train.epochs}): no epoch would be modulated"]
        return []

    def setup(self, model, datasets) -> None:
        super().setup(model, datasets)
        device = self.runtime.device
        # Official: train_score_a = train_score_v = 0 before the first epoch; scale_a = scale_v = 1.
        self.running_scores = torch.zeros(len(MODALITIES), dtype=torch.float64, device=device)
        self.scales = torch.ones(len(MODALITIES), dtype=torch.float64, device=device)
        fusion = model.fusion
        self.clip_test = [getattr(fusion, name).weight for name in _output_layer_names(model.fusion_name)]
        probes = {id(p) for name in ("probe_audio", "probe_visual") if hasattr(model, name)
                  for p in getattr(model, name).parameters()}
        self.clipped_params = [p for p in model.parameters() if p.requires_grad and id(p) not in probes]

    def start_epoch(self, epoch: int) -> None:
        end = self.config.modulation_end_epoch
        self.modulate = self.config.modulation_first_epoch <= epoch and (end is None or epoch < end)

    def train_step(self, model, optimizer, batch, epoch: int, step: int, sums, autocast):
        F = torch.nn.functional
        raw = self.model
        optimizer.zero_grad(set_to_none=True)
        with autocast():
            out = model(batch.audio, batch.visual)  # f(a, v): train mode (BatchNorm statistics update here only)
            # Official GradMod.forward: the masked passes run in eval mode *with* autograd. Through the
            # unwrapped module: their gradients reach the same parameters, which DDP reduces once.
            was_training = raw.training
            raw.eval()
            try:
                visual_masked = raw(batch.audio, torch.zeros_like(batch.visual)).logits  # f(a, 0): pad_visual_out
                audio_masked = raw(torch.zeros_like(batch.audio), batch.visual).logits  # f(0, v): pad_audio_out
            finally:
                raw.train(was_training)
            phi_a, phi_v = agm.shapley_responses(out.logits, audio_masked, visual_masked)

        # Scores over the global batch: every rank computes the same coefficients.
        totals = distributed.all_reduce_sum(agm.mono_modal_score_sums(phi_a, phi_v, batch.labels))
        scores = totals[:2].double() / totals[2].double()
        iteration = agm.global_iteration(epoch, len(self.loaders["train"]), step)
        coeffs = agm.agm_coefficients(scores, self.running_scores, self.config.modulation_strength,
                                      self.config.coefficient_exponent_cap)
        self.running_scores = agm.update_running_scores(self.running_scores, scores, iteration)
        if self.modulate:
            self.scales = coeffs.coefficients

        with autocast():
            fused = agm.modulated_output(phi_a, phi_v, self.scales[0], self.scales[1])  # = f(a, v) forward
            loss = F.cross_entropy(fused, batch.labels)
            if raw.has_probe_heads:  # detached probes (FiLM / gated), as in `normal`: train only themselves
                loss = loss + F.cross_entropy(out.logits_audio, batch.labels) + F.cross_entropy(out.logits_visual, batch.labels)
        loss.backward()
        if self.config.fusion_grad_clip is not None:
            # After DDP's all-reduce the gradients, hence the test and the clip, agree on every rank.
            clipped = agm.clip_when_exceeded(self.clipped_params, self.clip_test, self.config.fusion_grad_clip)
            sums["agm_clipped"] += clipped.to(scores.device, torch.float32)
        optimizer.step()

        for i, m in enumerate(MODALITIES):
            sums[f"agm_score_{m}"] += scores[i]
            sums[f"agm_ratio_{m}"] += coeffs.ratios[i]
            sums[f"agm_running_ratio_{m}"] += coeffs.running_ratios[i]
            sums[f"agm_coeff_{m}"] += coeffs.coefficients[i]
            sums[f"agm_scale_{m}"] += self.scales[i]
        return loss

    def evaluate(self, loaders, autocast) -> dict[str, float]:
        metrics = super().evaluate(loaders, autocast)
        # The per-modality accuracies official AGM reports: of phi_a, phi_v (the engine's acc_audio /
        # acc_visual read the fusion's slices or the probe heads, as for every method).
        metrics.update(agm.mono_modal_accuracy(self.model, loaders["val"], self.runtime.device, autocast))
        return metrics

    def end_epoch(self, epoch: int, metrics: dict[str, float]) -> None:
        metrics["agm_modulation_active"] = float(self.modulate)
        for m, value in zip(MODALITIES, self.running_scores.tolist()):
            metrics[f"agm_running_score_{m}"] = value

    def state_dict(self):
        return {"running_scores": self.running_scores.tolist(), "scales": self.scales.tolist()}

    def load_state_dict(self, state) -> None:
        device = self.runtime.device
        self.running_scores = torch.tensor(state["running_scores"], dtype=torch.float64, device=device)
        self.scales = torch.tensor(state["scales"], dtype=torch.float64, device=device)


def _output_layer_names(fusion: str) -> tuple[str, ...]:
    """The fusion's output layers whose weight gradient the clipping test reads (official: ``fc_out``)."""
    return ("fc_x", "fc_y") if fusion == "sum" else ("fc_out",)
