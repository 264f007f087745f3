"""PMR, Prototypical Modal Rebalance (Fan et al., CVPR 2023): the joint classifier of ``normal`` plus a
prototype-based cross-entropy that speeds up the slow modality and, in the first epochs, an entropy
regulariser that holds back the dominant one. The imbalance ratio of the two modalities' prototype
classifiers picks which modality gets which term at every step. Formulas: ``models/pmr.py``.

Follows the official Modal-Imbalance-PMR/main_Prototype_grad.py (HEAD 3615e48) and the paper:

* Prototypes (Eq. 6) come from the representations the official ``AVClassifier`` returns, i.e. the
  fusion module's first two outputs: the encoder features for concat/sum/FiLM, ``fc_x(a), fc_y(v)``
  for gated fusion. They are computed without gradient, in eval mode, over a random tenth of the
  training split: once before epoch 0 and again after every training epoch (official ``main``). From
  the prototypes computed after epoch 1 on they are momentum-averaged with the previous ones
  (Eq. 12; official ``if epoch <= 0``). The prototypes after epoch e train epoch e + 1 and score
  validation at epoch e (``acc_audio_proto``, ``acc_visual_proto``, the official ``acc_a_p``/``acc_v_p``).
* Inside the rebalancing window every step adds alpha * beta * PCE_audio + alpha * gamma * PCE_visual
  (Eq. 10); beta and gamma come from the ratio rho = s_a / s_v of the batch's prototype scores
  (Eq. 8), as the official code sets them (0 or 1) or, with ``coefficient_rule: clipped_ratio``, by
  the paper's Eq. 11. Outside the window the loss is the plain cross-entropy (official).
* In epochs e < ``entropy_epochs`` (E_r, Algorithm 1), inside the window, the loss also subtracts
  mu * gamma * H_audio + mu * beta * H_visual (Eq. 13).

Departures, each logged as a run param where the spec alone does not say it:

* The entropy regulariser (Eq. 13) is not in the official code (its issues #4, #7, #9); it follows
  the paper. The paper gives mu as "1e-2 or 1e-3" per dataset without saying which and E_r as
  "the first few epochs" without a number; the defaults here (1e-2, 10) are choices.
  ``entropy_weight: 0`` reproduces the official code. (``pmr_entropy_term``)
* The prototype subset is ``floor(fraction * N)`` clips drawn by a generator seeded from the spec's
  seed and the epoch, so every DDP rank draws the same subset and a resumed run the same one; the
  official code takes the first ``len(loader) // 10`` whole batches of the shuffled loader. A class
  the draw missed gets one random clip of its own (the official code divides by zero there).
  (``pmr_prototype_subset``)
* DDP: each rank encodes its share of the subset and the per-class feature sums and counts are
  all-reduced, so the prototypes are identical on every rank; the two prototype scores of Eq. 8 are
  summed over ranks, so beta and gamma come from the global batch, as in the single-GPU official code.
* The ``film``/``gated`` models also train avtune's detached probe heads (they read detached features
  and leave the encoders as they are); they only give ``acc_audio``/``acc_visual``.
"""
from __future__ import annotations

from contextlib import nullcontext
from typing import Literal

from pydantic import Field, model_validator

from workers.methods.base import MethodSection, lazy_module, register_method
from workers.methods.supervised import Normal

torch = lazy_module("torch")
data = lazy_module("torch.utils.data")
pmr = lazy_module("models.pmr")
distributed = lazy_module("workers.distributed")


class PMRSection(MethodSection):
    """PMR. The rebalancing (PCE) terms apply in the 0-based epochs [rebalance_start_epoch, rebalance_end_epoch)."""

    name: Literal["pmr"] = "pmr"
    pce_weight: float = Field(1.0, ge=0, le=100, description=(
        "alpha (Eq. 10): weight of the slow modality's prototypical cross-entropy; official --alpha "
        "(default 1.0; bash.sh CREMA-D concat 2.0)"))
    coefficient_rule: Literal["indicator", "clipped_ratio"] = Field("indicator", description=(
        "beta/gamma from the imbalance ratio rho: 'indicator' = official train_epoch (1 for the slow "
        "modality, 0 for the other); 'clipped_ratio' = paper Eq. 11 (clip(1/rho - 1) / clip(rho - 1) to [0, 1])"))
    entropy_weight: float = Field(1e-2, ge=0, le=10, description=(
        "mu (Eq. 13): weight of the dominant modality's prototype-entropy regulariser (paper: 1e-2 or "
        "1e-3); absent from the official code, which 0 reproduces"))
    entropy_epochs: int = Field(10, ge=0, le=10000, description=(
        "E_r (Algorithm 1): the entropy regulariser applies in the 0-based epochs e < E_r (paper: "
        "'the first few epochs', no number given)"))
    prototype_momentum: float = Field(0.0, ge=0, lt=1, description=(
        "epsilon (Eq. 12): c = (1 - eps) c_new + eps c_old between epochs; official --momentum_coef "
        "(argparse default 0.2, 0.0 in every PMR command of bash.sh)"))
    prototype_subset_fraction: float = Field(0.1, gt=0, le=1, description=(
        "share of the training split the prototypes are computed over each epoch (paper Sec. 5.2 and "
        "Tab. 5: one tenth; official len(loader) // 10 batches)"))
    rebalance_start_epoch: int = Field(0, ge=0, le=10000, description="first 0-based epoch with the PCE terms")
    rebalance_end_epoch: int = Field(101, ge=1, le=10001, description=(
        "first epoch after the window: [start, end) is rebalanced. Official main_Prototype_grad.py "
        "rebalances starts <= epoch <= ends, so its `--modulation_ends E` (default 100) is E + 1 here"))

    @model_validator(mode="after")
    def _window(self) -> "PMRSection":
        if self.rebalance_end_epoch <= self.rebalance_start_epoch:
            raise ValueError(
                f"method.rebalance_end_epoch ({self.rebalance_end_epoch}) must be greater than "
                f"method.rebalance_start_epoch ({self.rebalance_start_epoch})"
            )
        return self


@register_method
class PMR(Normal):
    """``normal``'s joint classifier trained with CE + PCE of the slow modality (+ PER of the dominant one)."""

    Section = PMRSection
    label_fields = ("pce_weight", "coefficient_rule", "entropy_weight", "entropy_epochs", "prototype_momentum",
                    "rebalance_start_epoch", "rebalance_end_epoch")
    run_param_keys = ("pmr_features", "pmr_prototype_subset", "pmr_entropy_term")

    @classmethod
    def run_label(cls, section: PMRSection) -> list[str]:
        parts = [f"a{section.pce_weight:g}", f"mu{section.entropy_weight:g}", f"er{section.entropy_epochs}",
                 f"m{section.prototype_momentum:g}", f"w{section.rebalance_start_epoch}-{section.rebalance_end_epoch}"]
        return parts + (["clip"] if section.coefficient_rule == "clipped_ratio" else [])

    @classmethod
    def run_params(cls, spec) -> dict[str, str]:
        m = spec.method
        per = m.entropy_weight > 0 and min(m.entropy_epochs, m.rebalance_end_epoch) > m.rebalance_start_epoch
        return {
            # Official AVClassifier returns the fusion module's (x_out, y_out): projections for gated fusion.
            "pmr_features": "gated_fusion_projections" if spec.model.fusion == "gated" else "encoder_outputs",
            "pmr_prototype_subset": f"seeded_uniform_{m.prototype_subset_fraction:g}+1_per_missing_class",
            "pmr_entropy_term": "paper_eq13" if per else "off_as_official_code",
        }

    @classmethod
    def spec_problems(cls, spec) -> list[str]:
        m = spec.method
        if m.rebalance_start_epoch >= spec.train.epochs:
            return [f"method.rebalance_start_epoch ({m.rebalance_start_epoch}) must be below "
                    f"train.epochs ({spec.train.epochs}): the rebalancing window would never open"]
        return []

    # ---- model and feature capture ----

    def build_model(self, num_classes: int):
        self.num_classes = num_classes
        return super().build_model(num_classes)

    def setup(self, model, datasets) -> None:
        super().setup(model, datasets)
        self.prototypes: dict[str, object] | None = None  # {"audio": (K, D_a), "visual": (K, D_v)}
        self.prototypes_for_epoch = -1
        self._capture = False
        self._features = None
        # The representations z of the paper are what the official AVClassifier returns next to the
        # logits: the fusion module's first two outputs. A forward hook reads them during the (possibly
        # DDP-wrapped) forward pass, so gradients flow through one graph.
        model.fusion.register_forward_hook(self._keep_features)

    def _keep_features(self, module, inputs, output) -> None:
        if self._capture:
            self._features = (output[0], output[1])

    def _feature_dims(self) -> tuple[int, int]:
        fusion = self.model.fusion
        if self.spec.model.fusion == "gated":
            return fusion.fc_x.out_features, fusion.fc_y.out_features
        return self.model.audio_encoder.out_dim, self.model.visual_encoder.out_dim

    def _encode(self, audio, visual):
        """(z_audio, z_visual) of the raw model, without gradient."""
        self._capture = True
        try:
            with torch.no_grad():
                self.model(audio, visual)
            return self._features
        finally:
            self._capture, self._features = False, None

    # ---- prototypes ----

    def _compute_prototypes(self, for_epoch: int) -> int:
        """The prototypes that train epoch ``for_epoch``, from the model as it is now; returns how many
        clips they were computed over (official ``calculate_prototype``)."""
        device, rank, world = self.runtime.device, self.runtime.rank, self.runtime.world_size
        template = self.loaders["train_eval"]
        dataset = template.dataset
        generator = torch.Generator().manual_seed(self.spec.train.seed * 1_000_003 + 7919 * for_epoch + 17)
        subset = pmr.prototype_subset(dataset.labels, self.config.prototype_subset_fraction, self.num_classes, generator)
        shard = subset[rank::world].tolist()  # each rank encodes its share; the sums are all-reduced below
        loader = data.DataLoader(data.Subset(dataset, shard), batch_size=template.batch_size, shuffle=False,
                                 num_workers=template.num_workers, pin_memory=template.pin_memory,
                                 generator=torch.Generator().manual_seed(for_epoch))
        d_a, d_v = self._feature_dims()
        k = self.num_classes
        sums_a = torch.zeros(k, d_a, device=device)
        sums_v = torch.zeros(k, d_v, device=device)
        counts = torch.zeros(k, device=device)
        was_training = self.model.training
        self.model.eval()  # official: model.eval() and torch.no_grad()
        for audio, visual, labels, _ in loader:
            labels = labels.to(device)
            z_a, z_v = self._encode(audio.to(device), visual.to(device))
            part_a, n = pmr.class_feature_sums(z_a, labels, k)
            part_v, _ = pmr.class_feature_sums(z_v, labels, k)
            sums_a += part_a
            sums_v += part_v
            counts += n
        self.model.train(was_training)
        packed = distributed.all_reduce_sum(torch.cat([sums_a.flatten(), sums_v.flatten(), counts]))
        sums_a, sums_v, counts = packed.split([k * d_a, k * d_v, k])
        previous = self.prototypes or {}
        new = {"audio": pmr.prototypes_from_sums(sums_a.view(k, d_a), counts, previous.get("audio")),
               "visual": pmr.prototypes_from_sums(sums_v.view(k, d_v), counts, previous.get("visual"))}
        # Official main(): calculate_prototype(..., epoch) after training epoch `epoch` mixes in the old
        # prototypes only `if epoch > 0`, i.e. for the prototypes that train epoch 2 onwards.
        if self.prototypes is not None and for_epoch >= 2 and self.config.prototype_momentum > 0:
            new = {m: pmr.momentum_prototypes(new[m], self.prototypes[m], self.config.prototype_momentum) for m in new}
        self.prototypes, self.prototypes_for_epoch = new, for_epoch
        return len(subset)

    # ---- training ----

    def start_epoch(self, epoch: int) -> None:
        c = self.config
        self.rebalance = c.rebalance_start_epoch <= epoch < c.rebalance_end_epoch
        self.entropy_on = self.rebalance and epoch < c.entropy_epochs
        self.prototype_clips = None
        if self.prototypes is None or self.prototypes_for_epoch != epoch:
            self.prototype_clips = self._compute_prototypes(epoch)  # before epoch 0 (official main)

    def train_step(self, model, optimizer, batch, epoch, step, sums, autocast):
        self._capture = True
        try:
            return super().train_step(model, optimizer, batch, epoch, step, sums, autocast)
        finally:
            self._capture, self._features = False, None

    def loss(self, out, batch, sums):
        base = super().loss(out, batch, sums)  # CE of the fused logits (+ detached probe heads)
        z_a, z_v = self._features
        self._features = None
        c, labels = self.config, batch.labels
        with nullcontext() if self.rebalance else torch.no_grad():  # outside the window: logged only
            logits_a = pmr.prototype_logits(z_a, self.prototypes["audio"])
            logits_v = pmr.prototype_logits(z_v, self.prototypes["visual"])
            pce_a = pmr.prototypical_cross_entropy(logits_a, labels)
            pce_v = pmr.prototypical_cross_entropy(logits_v, labels)
            ent_a = pmr.prototype_entropy(logits_a)
            ent_v = pmr.prototype_entropy(logits_v)
        # Scores of the global batch: identical beta/gamma on every DDP rank.
        scores = distributed.all_reduce_sum(torch.stack(pmr.prototype_scores(logits_a, logits_v, labels)))
        coeffs = pmr.pmr_coefficients_from_scores(scores[0], scores[1], c.coefficient_rule)
        if self.rebalance:
            loss = pmr.pmr_loss(base, pce_a, pce_v, ent_a, ent_v, coeffs, c.pce_weight, c.entropy_weight,
                                self.entropy_on)
        else:
            loss = base
        on, per = float(self.rebalance), float(self.entropy_on)
        sums["pmr_ratio_av"] += coeffs.ratio_av
        sums["pmr_audio_slow"] += (coeffs.ratio_av < 1).float()
        sums["pmr_pce_weight_audio"] += on * c.pce_weight * coeffs.accel_audio
        sums["pmr_pce_weight_visual"] += on * c.pce_weight * coeffs.accel_visual
        sums["pmr_entropy_weight_audio"] += per * c.entropy_weight * coeffs.accel_visual
        sums["pmr_entropy_weight_visual"] += per * c.entropy_weight * coeffs.accel_audio
        sums["loss_pce_audio"] += pce_a.detach()
        sums["loss_pce_visual"] += pce_v.detach()
        sums["entropy_proto_audio"] += ent_a.detach()
        sums["entropy_proto_visual"] += ent_v.detach()
        return loss

    # ---- after the epoch ----

    def _prototype_accuracy(self, loader) -> dict[str, float]:
        """Accuracy of each modality's nearest-prototype classifier (official ``valid``: acc_a_p, acc_v_p)."""
        device = self.runtime.device
        self.model.eval()
        correct = torch.zeros(2, device=device)
        n = 0
        for audio, visual, labels, _ in loader:
            labels = labels.to(device)
            z_a, z_v = self._encode(audio.to(device), visual.to(device))
            for i, (z, m) in enumerate(((z_a, "audio"), (z_v, "visual"))):
                with torch.no_grad():
                    correct[i] += (pmr.prototype_logits(z, self.prototypes[m]).argmax(1) == labels).sum()
            n += labels.numel()
        acc_a, acc_v = (correct / max(n, 1)).tolist()
        return {"acc_audio_proto": acc_a, "acc_visual_proto": acc_v}

    def end_epoch(self, epoch: int, metrics: dict[str, float]) -> None:
        # Official main(): after each training epoch, recompute the prototypes (they train the next
        # epoch) and score the held-out split with them.
        clips = self._compute_prototypes(epoch + 1)
        metrics["pmr_prototype_clips"] = float(clips)
        metrics.update(self._prototype_accuracy(self.loaders["val"]))
        metrics["pmr_rebalance_active"] = float(self.rebalance)
        metrics["pmr_entropy_active"] = float(self.entropy_on)

    def state_dict(self):
        protos = None if self.prototypes is None else {m: p.detach().cpu() for m, p in self.prototypes.items()}
        return {"prototypes": protos, "prototypes_for_epoch": self.prototypes_for_epoch}

    def load_state_dict(self, state) -> None:
        protos = state["prototypes"]
        device = self.runtime.device
        self.prototypes = None if protos is None else {m: p.to(device) for m, p in protos.items()}
        self.prototypes_for_epoch = state["prototypes_for_epoch"]
