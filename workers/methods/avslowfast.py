"""Audiovisual SlowFast (Xiao et al., 2020): Slow, Fast and Audio pathways with lateral fusion and
DropPathway (``models/avslowfast.py``), trained as a supervised classifier."""
from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from workers.methods.base import Method, MethodSection, lazy_module, register_method

models = lazy_module("models")


# Junctions (one per residual stage) of each configuration in models/avslowfast.py; tested to agree.
JUNCTIONS = {"tiny": 2, "paper": 4}


class AVSlowFastSection(MethodSection):
    name: Literal["avslowfast"] = "avslowfast"
    config: Literal["tiny", "paper"] = "tiny"
    drop_pathway_rate: float = Field(0.8, ge=0, le=1)
    fusion_junctions: list[bool] | None = Field(None, description=(
        "per junction (pool1, res2, res3, res4 for paper), whether the Fast->Slow and Audio->(Fast, Slow) "
        "laterals are used; None: the config's own (paper: the official [false, false, true, true])"))

    @model_validator(mode="after")
    def _junction_count(self) -> "AVSlowFastSection":
        if self.fusion_junctions is not None and len(self.fusion_junctions) != JUNCTIONS[self.config]:
            raise ValueError(f"method.fusion_junctions: the {self.config} config has {JUNCTIONS[self.config]} "
                             f"junctions, got {len(self.fusion_junctions)} flags")
        return self


@register_method
class AVSlowFast(Method):
    Section = AVSlowFastSection

    @classmethod
    def spec_problems(cls, spec) -> list[str]:
        if spec.data.decode.num_frames % 4:
            return ["data.decode.num_frames must be a multiple of 4 for avslowfast (slow/fast alpha=4)"]
        return []

    def build_model(self, num_classes: int):
        junctions = self.config.fusion_junctions
        return models.build_avslowfast(num_classes, config=self.config.config,
                                       drop_pathway_rate=self.config.drop_pathway_rate,
                                       fusion_junctions=tuple(junctions) if junctions is not None else None)
