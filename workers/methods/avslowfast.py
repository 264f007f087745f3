"""Audiovisual SlowFast (Xiao et al., 2020): Slow, Fast and Audio pathways with lateral fusion and
DropPathway (``models/avslowfast.py``), trained as a supervised classifier."""
from __future__ import annotations

from typing import Literal

from pydantic import Field

from workers.methods.base import Method, MethodSection, lazy_module, register_method

models = lazy_module("models")


class AVSlowFastSection(MethodSection):
    name: Literal["avslowfast"] = "avslowfast"
    config: Literal["tiny", "paper"] = "tiny"
    drop_pathway_rate: float = Field(0.8, ge=0, le=1)


@register_method
class AVSlowFast(Method):
    Section = AVSlowFastSection

    @classmethod
    def spec_problems(cls, spec) -> list[str]:
        if spec.data.decode.num_frames % 4:
            return ["data.decode.num_frames must be a multiple of 4 for avslowfast (slow/fast alpha=4)"]
        return []

    def build_model(self, num_classes: int):
        return models.build_avslowfast(num_classes, config=self.config.config,
                                       drop_pathway_rate=self.config.drop_pathway_rate)
