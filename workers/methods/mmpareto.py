"""MMPareto (Wei & Hu, ICML 2024): the multimodal and the uni-modal losses' gradients on each encoder are
summed where they agree (cosine > 0) and combined by their Pareto min-norm weights where they conflict,
then rescaled to at least the plain sum's magnitude and enlarged by gamma. Formulas in ``models/mmpareto.py``
follow official ``MMPareto_ICML2024/code/MMPareto.py`` (``train_epoch``) and ``min_norm_solvers.py``.

One step, in the official order: forward; ``L_m = CE(joint)``, ``L_a = CE(audio head)``, ``L_v = CE(visual
head)``; the gradient of ``L_m`` on both encoders and of ``L_a`` / ``L_v`` on their own encoder (official:
three ``backward(retain_graph=True)`` passes with ``zero_grad`` between, here ``torch.autograd.grad``, which
leaves ``.grad`` alone: the same numbers); ``(L_m + L_a + L_v).backward()`` (heads keep these gradients;
the encoders' are the official ``three_norm`` reference); each encoder's gradient replaced by the MMPareto
combination; ``optimizer.step()``. The logged ``loss_train`` is ``L_m + L_a + L_v`` (official ``_loss``).

Departures, none of which changes a number in a single process:

* DDP: the sub-gradients from ``torch.autograd.grad`` bypass DDP's all-reduce, so they are averaged over
  ranks here before the cosine and the weights (then identical on every rank; with equal shards the
  average is the full-batch gradient official DataParallel computes); ``L_m + L_a + L_v`` goes through
  DDP's own backward.
* ``||new|| == 0`` on a tensor (official: a division by zero, NaN): that tensor's gradient is 0.
* ``model.fusion`` other than ``concat`` replaces official's concat joint head (run param
  ``mmpareto_joint_head`` says which ran).
"""
from __future__ import annotations

from typing import Literal

from pydantic import Field

from workers.methods.base import Method, MethodSection, lazy_module, register_method

torch = lazy_module("torch")
mmpareto = lazy_module("models.mmpareto")
distributed = lazy_module("workers.distributed")

MODALITIES = ("audio", "visual")


class MMParetoSection(MethodSection):
    """MMPareto's only setting is the magnitude factor; the rest (the 1/2 weights, the min-norm solver,
    the norm rescaling) is fixed by the method."""

    name: Literal["mmpareto"] = "mmpareto"
    magnitude_scale: float = Field(1.5, gt=0, le=10, description=(
        "gamma: every encoder gradient is multiplied by it after the combination and the norm rescaling "
        "(official MMPareto.py `gamma=1.5`; BalanceMM's MMPareto `alpha: 1.5`)"))


@register_method
class MMPareto(Method):
    """Joint classifier with separate uni-modal heads (official ``AVClassifier``); encoder gradients
    combined per modality by MMPareto; per-epoch conflict rate, mean cosine and mean weights logged."""

    Section = MMParetoSection
    label_fields = ("magnitude_scale",)
    run_param_keys = ("mmpareto_joint_head",)

    @classmethod
    def run_label(cls, section: MMParetoSection) -> list[str]:
        return [f"gamma{section.magnitude_scale:g}"]

    @classmethod
    def run_params(cls, spec) -> dict[str, str]:
        fusion = spec.model.fusion
        return {"mmpareto_joint_head": "concat (official)" if fusion == "concat" else f"{fusion} (official: concat)"}

    def build_model(self, num_classes: int):
        m = self.spec.model
        return mmpareto.build_mmpareto_classifier(num_classes, fusion=m.fusion, audio_arch=m.audio_arch,
                                                  visual_arch=m.visual_arch, width=m.width)

    def setup(self, model, datasets) -> None:
        super().setup(model, datasets)
        self.encoder_params = {
            "audio": [p for p in model.audio_encoder.parameters() if p.requires_grad],
            "visual": [p for p in model.visual_encoder.parameters() if p.requires_grad],
        }

    def loss(self, out, batch, sums):
        """``L_m + L_a + L_v`` (official uniform sum): what a plain backward would train."""
        F = torch.nn.functional
        return sum(F.cross_entropy(x, batch.labels) for x in (out.logits, out.logits_audio, out.logits_visual))

    def train_step(self, model, optimizer, batch, epoch: int, step: int, sums, autocast):
        F = torch.nn.functional
        optimizer.zero_grad(set_to_none=True)
        with autocast():
            out = model(batch.audio, batch.visual)
            loss_multi = F.cross_entropy(out.logits, batch.labels)
            loss_uni = {"audio": F.cross_entropy(out.logits_audio, batch.labels),
                        "visual": F.cross_entropy(out.logits_visual, batch.labels)}
        params = self.encoder_params
        # Official: loss_mm.backward / loss_a.backward / loss_v.backward (retain_graph), each encoder's
        # gradients recorded (grads_audio['both'|'audio'], grads_visual['both'|'visual']).
        g_multi = _grads(loss_multi, params["audio"] + params["visual"])
        g_multi = {"audio": g_multi[:len(params["audio"])], "visual": g_multi[len(params["audio"]):]}
        g_uni = {m: _grads(loss_uni[m], params[m]) for m in MODALITIES}
        flat = torch.cat([g.reshape(-1) for m in MODALITIES for g in (*g_multi[m], *g_uni[m])])
        if self.runtime.world_size > 1:  # the same (averaged) sub-gradients on every rank
            flat = distributed.all_reduce_sum(flat) / self.runtime.world_size
        # Official: loss = loss_mm + loss_a + loss_v; loss.backward() (heads keep these gradients).
        total = loss_multi + loss_uni["audio"] + loss_uni["visual"]
        total.backward()

        offset = 0
        for m in MODALITIES:
            sizes = [p.numel() for p in params[m]]
            n = sum(sizes)
            gm, gu = flat[offset:offset + n], flat[offset + n:offset + 2 * n]
            offset += 2 * n
            weights = mmpareto.combination_weights(gm, gu)

            def per_tensor(vector):
                return [g.view(p.shape) for g, p in zip(vector.split(sizes), params[m])]

            # official three_norm = ||param.grad|| after loss.backward()
            grads_sum = [torch.zeros_like(p) if p.grad is None else p.grad for p in params[m]]
            final = mmpareto.combine_gradients(per_tensor(gm), per_tensor(gu), weights, self.config.magnitude_scale,
                                               grads_sum=grads_sum)
            with torch.no_grad():
                norm_sum = torch.sqrt(sum(g.float().pow(2).sum() for g in grads_sum))
                norm_final = torch.sqrt(sum(g.float().pow(2).sum() for g in final))
                for p, g in zip(params[m], final):
                    if p.grad is None:
                        p.grad = g
                    else:
                        p.grad.copy_(g)
            sums[f"mmpareto_conflict_rate_{m}"] += (weights.cos <= 0).float()
            sums[f"mmpareto_cos_{m}"] += weights.cos.detach().float()
            sums[f"mmpareto_w_multi_{m}"] += weights.w_multi.detach().float()
            sums[f"mmpareto_w_uni_{m}"] += weights.w_uni.detach().float()
            # ||final|| / ||g_m + g_u|| over the encoder: gamma without a conflict, gamma * >= 1 per tensor with one.
            sums[f"mmpareto_grad_ratio_{m}"] += norm_final / norm_sum.clamp_min(1e-30)
        sums["loss_train_multi"] += loss_multi.detach().float()
        for m in MODALITIES:
            sums[f"loss_train_{m}"] += loss_uni[m].detach().float()
        optimizer.step()
        return total


def _grads(loss, params) -> list:
    """d loss / d params without touching ``.grad``; zeros where a parameter does not reach ``loss``
    (official: a ``param.grad`` left at zero by ``optimizer.zero_grad()``)."""
    grads = torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)
    return [torch.zeros_like(p) if g is None else g for p, g in zip(params, grads)]
