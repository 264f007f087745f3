"""AVID and AVID-CMA self-supervised pre-training (Morgado et al., CVPR 2021): instance discrimination
against per-modality memory banks with the official NCE loss, and for ``cma`` positive sets chosen by
cross-modal agreement (``models/avid_cma.py``). Evaluated every epoch by linear probes on frozen
features (Sec. 5), so there is no classifier head and no test-split protocol here."""
from __future__ import annotations

from typing import Literal

from pydantic import Field

from workers.methods.base import Method, MethodSection, lazy_module, register_method

torch = lazy_module("torch")
models = lazy_module("models")
distributed = lazy_module("workers.distributed")
evaluation = lazy_module("workers.evaluation")

DEFAULT_CONFIG = {"avid": "Cross-N1024", "cma": "InstX-N1024-PosW-N64-Top32"}


class AVIDSection(MethodSection):
    """AVID / CMA self-supervised pre-training with a linear probe each epoch."""

    name: Literal["avid", "cma"] = "avid"
    config: str = Field("", description="official criterion name; empty picks Cross-N1024 (avid) or InstX-N1024-PosW-N64-Top32 (cma)")
    embedding_dim: int = Field(128, ge=8, le=2048)
    probe_epochs: int = Field(100, ge=1)


@register_method
class AVID(Method):
    Section = AVIDSection
    self_supervised = True

    def build_model(self, num_classes: int):
        m = self.spec.model
        return models.build_avid_model(embedding_dim=self.config.embedding_dim, audio_arch=m.audio_arch,
                                       visual_arch=m.visual_arch, width=m.width)

    def setup(self, model, datasets) -> None:
        super().setup(model, datasets)
        self.num_classes = datasets["train"].num_classes
        config = models.parse_avid_config(self.config.config or DEFAULT_CONFIG[self.config.name])
        criterion = models.CMACriterion if self.config.name == "cma" else models.AVIDCriterion
        self.criterion = criterion(config, num_items=len(datasets["train"]), embedding_dim=self.config.embedding_dim,
                                   generator=torch.Generator().manual_seed(self.spec.train.seed)).to(self.runtime.device)

    def start_epoch(self, epoch: int) -> None:
        # CMA resamples its positive sets every `resample_freq` epochs (official train loop's set_epoch);
        # a no-op for AVID. From scratch, the first sets come from the random initial memory.
        self.criterion.set_epoch(epoch)

    def loss(self, out, batch, sums):
        return self.criterion(out, batch.index)[0]

    def after_step(self, out, batch) -> None:
        # Every rank updates its memory with the whole global batch, so the banks stay identical.
        with torch.no_grad():
            gathered = type(out)(*(distributed.all_gather_cat(x.detach()) for x in out))
            self.criterion.update_memory(gathered, distributed.all_gather_cat(batch.index))

    def evaluate(self, loaders, autocast) -> dict[str, float]:
        return evaluation.evaluate_linear_probes(self.model, loaders["train_eval"], loaders["val"], self.runtime.device,
                                                 self.num_classes, self.config.probe_epochs, self.spec.train.seed)

    def end_epoch(self, epoch: int, metrics: dict[str, float]) -> None:
        metrics["loss"] = metrics["loss_train"]
        metrics["gap_av"] = metrics["acc_audio"] - metrics["acc_visual"]

    def test_metrics(self, loaders, autocast) -> dict[str, float]:
        return {}

    def state_dict(self):
        return {"criterion": self.criterion.state_dict()}

    def load_state_dict(self, state) -> None:
        self.criterion.load_state_dict(state["criterion"])
