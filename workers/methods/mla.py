"""MLA (Zhang et al., CVPR 2024): alternating uni-modal adaptation through a shared head, the head's
gradient projected against forgetting, and test-time entropy-weighted fusion. Formulas in
``models/mla.py`` follow the official code (Cecile-hi/Multimodal-Learning-with-Alternating-Unimodal-
Adaptation, ``main.py`` ``train_epoch`` with ``--gs_flag``, ``valid`` with ``--dynamic``;
``utils/utils.py`` ``GSPlugin``).

Each training batch takes two optimiser steps, audio then visual (official order): the modality's
encoder and the shared head on that modality's cross-entropy, the head's weight gradient projected by
the running projector before the step. ``acc`` is the entropy-fused prediction, ``acc_audio`` /
``acc_visual`` each modality through the shared head.

Departures from the official code (the first three also logged by ``run_params``):

* The projection is applied. Official HEAD's ``GSPlugin.before_update`` only acts on a parameter named
  ``"module.weight"``, but it is handed ``fusion_module.fc_out`` (an ``nn.Linear``, parameters
  ``"weight"``/``"bias"``), so since commit 11ae1ee ("Fix bugs", which dropped ``or n == "weight"``)
  the projector is never updated and no gradient is projected. We follow the first release (4735bbc)
  and the paper's head gradient modification, where it acts; ``head_gradient_modification: false`` reproduces HEAD.
* The idle encoder is not stepped. Official ``optimizer.zero_grad()`` (torch 1.8.1) leaves zero-filled
  gradients, so in the visual step SGD also moves the audio encoder by its momentum and weight decay;
  here gradients are set to None (``zero_grad(set_to_none=True)``, torch >= 2 default) and a step moves
  only the trained encoder and the head.
* DDP: a step runs one encoder, which a DistributedDataParallel forward without
  ``find_unused_parameters`` refuses; the step runs the unwrapped module and averages the gradients over
  ranks itself (all-reduce / world size), and the projector's feature mean is the global batch's mean,
  so every rank updates an identical projector and takes an identical step. Official runs
  ``nn.DataParallel`` (one process; the mean is over the global batch too).
* The projector recursion defaults to OWM's scalar denominator ``alpha + r k`` (``projector_update: owm``),
  the orthogonal-projection update the paper's gradient modification describes: GSPlugin as written
  divides by the D x D outer product ``alpha + k r`` element-wise, which collapses P to rank 1 within a
  few updates (measured: effective rank 1.0 after a handful of steps vs 60-90 for OWM at D = 512) and
  can turn it non-finite; ``projector_update: official`` reproduces it (a label field, logged as a param).
* A projector update whose result is not finite is skipped (the previous P stays): with the official
  element-wise denominator ``alpha + k_i r_j`` can reach 0 and the official run would turn NaN.
  ``projector_updates_skipped`` logs the share of modality steps this happened in.
* ``loss_train`` is the mean of the two modality losses (official logs ``0.55 * loss_a + 0.45 * loss_v``
  with its fixed-fusion ``av_alpha``, which the dynamic fusion does not use).
"""
from __future__ import annotations

from typing import Any, Literal

from pydantic import Field

from workers.methods.base import Method, MethodSection, lazy_module, register_method

torch = lazy_module("torch")
mla = lazy_module("models.mla")
distributed = lazy_module("workers.distributed")

MODALITIES = ("audio", "visual")  # official train_epoch (gs_flag): the audio step, then the visual step


class MLASection(MethodSection):
    """MLA. The schedule (alternating steps every batch, every epoch) has no settings in the official code."""

    name: Literal["mla"] = "mla"
    head_gradient_modification: bool = Field(True, description=(
        "project the shared head's weight gradient by the running projector P before each step (the paper's "
        "head gradient modification, official GSPlugin.before_update); false: plain alternating steps, what "
        "official HEAD actually runs (its name check never matches)"))
    # Default 'owm' (a departure from the official code, logged by run_params): GSPlugin's element-wise
    # denominator collapses P to rank 1 within a few updates and can make it non-finite, which is not the
    # orthogonal-projection gradient modification the paper describes (Sec. 3.2) and GSPlugin transcribes.
    projector_update: Literal["official", "owm"] = Field("owm", description=(
        "P's recursion: 'owm' = P - k k^T / (alpha + r k), the scalar denominator of orthogonal weight "
        "modification (Zeng et al. 2019) that the paper's gradient modification uses; 'official' = GSPlugin's "
        "code as written, with the D x D outer product k r (element-wise division). k = P r^T, r the "
        "batch-mean feature, alpha = 0.1^(b/N + 1)"))
    fusion_entropy_scope: Literal["batch", "clip"] = Field("batch", description=(
        "entropy e_m behind the fusion weights w_m = exp(max e - e_m) / sum exp(max e - e): 'batch' = official "
        "calculate_entropy (softmax over the batch dim, summed over the whole batch: one weight pair per "
        "evaluation batch); 'clip' = per clip (softmax over classes, BalanceMM)"))


@register_method
class MLA(Method):
    """Alternating uni-modal steps through a shared head (``models.mla.MLAClassifier``)."""

    Section = MLASection
    label_fields = ("head_gradient_modification", "projector_update", "fusion_entropy_scope")
    run_param_keys = ("mla_head_projection", "mla_idle_encoder_step", "mla_gradient_sync")

    @classmethod
    def run_label(cls, section: MLASection) -> list[str]:
        projection = f"P-{section.projector_update}" if section.head_gradient_modification else "noproj"
        return [projection, f"H-{section.fusion_entropy_scope}"]

    @classmethod
    def run_params(cls, spec) -> dict[str, str]:
        return {
            # Official HEAD never projects (GSPlugin's name check); see the module docstring.
            "mla_head_projection": "applied" if spec.method.head_gradient_modification else "off",
            # Official (torch 1.8.1 zero-filled grads) also steps the idle encoder by momentum + weight decay.
            "mla_idle_encoder_step": "none",
            "mla_gradient_sync": "manual_allreduce" if spec.scaling.num_workers > 1 else "single_process",
        }

    @classmethod
    def spec_problems(cls, spec) -> list[str]:
        if spec.model.fusion != "concat":
            return [f"model.fusion ({spec.model.fusion!r}): MLA has no fusion layer, one linear head shared by both "
                    "modalities (official ConcatFusion(input_dim=512).fc_out under --gs_flag); set model.fusion: concat"]
        return []

    def build_model(self, num_classes: int):
        m = self.spec.model
        return mla.build_mla_classifier(num_classes, audio_arch=m.audio_arch, visual_arch=m.visual_arch,
                                        width=m.width, entropy_scope=self.config.fusion_entropy_scope)

    def setup(self, model, datasets) -> None:
        super().setup(model, datasets)
        # Official GSPlugin: Pl = eye(512) once per run, shared by the modalities; exp_count = 0.
        self.projector = torch.eye(model.feature_dim, device=self.runtime.device)
        self.updates = 0  # official exp_count: modality steps taken; no projection while it is 0
        self.steps_per_epoch = len(self.loaders["train"])  # official len(dataloader) (per rank under DDP)

    # ---- training ----

    def train_step(self, model, optimizer, batch, epoch: int, step: int, sums, autocast):
        F = torch.nn.functional
        raw = self.model  # `model` may be DDP-wrapped; a one-encoder forward goes around it (module docstring)
        losses = []
        for modality, x in zip(MODALITIES, (batch.audio, batch.visual)):
            optimizer.zero_grad(set_to_none=True)
            with autocast():
                features, logits = raw.unimodal(modality, x)
            loss = F.cross_entropy(logits.float(), batch.labels)
            loss.backward()
            self._average_gradients()
            if self.config.head_gradient_modification and self.updates != 0:  # official `train_exp_counter != 0`
                alpha = mla.owm_alpha(step, self.steps_per_epoch)
                updated = mla.update_projector(self.projector, self._global_mean(features), alpha,
                                               self.config.projector_update)
                # Guard (departure): an update that leaves P non-finite (the official element-wise
                # denominator alpha + k_i r_j can reach 0) is skipped, where the official run would go NaN.
                finite = torch.isfinite(updated).all()
                self.projector = torch.where(finite, updated, self.projector)
                sums["projector_updates_skipped"] += (~finite).float() / len(MODALITIES)
                weight = raw.head.weight
                weight.grad = mla.project_head_gradient(weight.grad, self.projector)
            optimizer.step()
            self.updates += 1
            sums[f"loss_train_{modality}"] += loss.detach()
            losses.append(loss.detach())
        optimizer.zero_grad(set_to_none=True)  # official: `del p.grad` for every parameter after the batch
        return (losses[0] + losses[1]) / 2

    def _average_gradients(self) -> None:
        """DDP: the mean of every rank's gradients on every rank (what DDP's reducer would do)."""
        if not distributed.is_distributed():
            return
        grads = [p.grad for p in self.model.parameters() if p.grad is not None]
        flat = torch._utils._flatten_dense_tensors(grads)
        distributed.all_reduce_sum(flat)
        flat /= self.runtime.world_size
        for grad, averaged in zip(grads, torch._utils._unflatten_dense_tensors(flat, grads)):
            grad.copy_(averaged)

    @staticmethod
    def _global_mean(features):
        """r = the batch-mean feature (official ``torch.mean(before_batch_input, 0)``) over the global
        batch: identical on every DDP rank, so every rank's projector stays the same. (D,) float32."""
        z = features.detach().float()
        total = torch.cat([z.sum(0), z.new_tensor([z.shape[0]])])
        total = distributed.all_reduce_sum(total)
        return total[:-1] / total[-1]

    def end_epoch(self, epoch: int, metrics: dict[str, float]) -> None:
        # (sum s)^2 / sum s^2 of P's singular values: how many directions the head's gradient keeps
        # (D at the start; the official recursion collapses P towards rank 1, the OWM one does not).
        if not self.config.head_gradient_modification:
            return
        s = torch.linalg.svdvals(self.projector.float())
        metrics["projector_effective_rank"] = (s.sum() ** 2 / (s ** 2).sum()).item()

    # ---- evaluation: acc is the fused prediction (the model's forward) ----

    # "batch"-scope fusion weights are computed over the evaluated batch, so the batch is part of the result:
    # the engine evaluates in batches of the global training batch, as the official test loader does
    # (main.py:813-817, DataLoader(test_dataset, batch_size=args.batch_size); entropy over the batch, main.py:65-70).

    def evaluate(self, loaders, autocast) -> dict[str, float]:
        metrics = super().evaluate(loaders, autocast)
        metrics.update(self.fusion_weight_means(loaders["val"], autocast))
        return metrics

    def test_metrics(self, loaders, autocast) -> dict[str, float]:
        metrics = super().test_metrics(loaders, autocast)
        metrics.update(self.fusion_weight_means(loaders["test"], autocast))
        return metrics

    def fusion_weight_means(self, loader, autocast) -> dict[str, float]:
        """Per-clip means of the fusion weights w_audio, w_visual the model's forward used on ``loader``
        (``"batch"`` scope: each clip counts its batch's weight)."""
        model, device = self.model, self.runtime.device
        model.eval()
        sums = torch.zeros(2, dtype=torch.float64, device=device)
        n = 0
        with torch.no_grad():
            for audio, visual, labels, _ in loader:
                with autocast():
                    _, w_audio, w_visual = model.forward_with_weights(audio.to(device), visual.to(device))
                b = labels.numel()
                sums += torch.stack([w.double().expand(b).sum() for w in (w_audio, w_visual)])
                n += b
        means = (sums / max(n, 1)).tolist()
        return {"fusion_weight_audio": means[0], "fusion_weight_visual": means[1]}

    # ---- method state: the running projector and the step counter (exact resume) ----

    def state_dict(self) -> dict[str, Any]:
        return {"projector": self.projector.detach().cpu().clone(), "updates": self.updates}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.projector = state["projector"].to(device=self.runtime.device, dtype=torch.float32)
        self.updates = int(state["updates"])
