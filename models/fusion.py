"""Late-fusion heads, following OGM-GE_CVPR2022/models/fusion_modules.py.

Every module takes ``(x, y)`` = (audio features (B, D_x), visual features (B, D_y)) in that
order, as OGM-GE's ``AVClassifier`` calls ``fusion_module(a, v)``, and returns
``(x_out, y_out, logits)`` like the official modules. The official modules assume both
modalities have 512-d features; here the two input widths are separate arguments.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

__all__ = ["FUSION_NAMES", "SumFusion", "ConcatFusion", "FiLM", "GatedFusion", "build_fusion"]

FUSION_NAMES: tuple[str, ...] = ("sum", "concat", "film", "gated")


class SumFusion(nn.Module):
    """``logits = fc_x(x) + fc_y(y)``; returns ``(x, y, logits)``."""

    def __init__(self, in_dim_x: int, in_dim_y: int, output_dim: int) -> None:
        super().__init__()
        self.fc_x = nn.Linear(in_dim_x, output_dim)
        self.fc_y = nn.Linear(in_dim_y, output_dim)

    def forward(self, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        return x, y, self.fc_x(x) + self.fc_y(y)


class ConcatFusion(nn.Module):
    """``logits = fc_out(cat([x, y]))``: columns ``[:D_x]`` of ``fc_out.weight`` see x (audio)."""

    def __init__(self, in_dim_x: int, in_dim_y: int, output_dim: int) -> None:
        super().__init__()
        self.in_dim_x = in_dim_x
        self.fc_out = nn.Linear(in_dim_x + in_dim_y, output_dim)

    def forward(self, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        return x, y, self.fc_out(torch.cat((x, y), dim=1))


class FiLM(nn.Module):
    """FiLM (Perez et al., AAAI 2018, arXiv:1709.07871): one modality predicts a per-channel
    scale and shift for the other.

    With ``x_film=True`` (OGM-GE's setting) x conditions y: ``gamma, beta = split(fc(x))``,
    ``logits = fc_out(gamma * y + beta)``; with ``x_film=False`` the roles swap. The official
    module splits ``fc``'s output at ``input_dim`` and so needs equal widths; here gamma/beta
    take the width of the modulated modality.
    """

    def __init__(self, in_dim_x: int, in_dim_y: int, output_dim: int, x_film: bool = True) -> None:
        super().__init__()
        self.x_film = x_film
        film_dim, self.dim = (in_dim_x, in_dim_y) if x_film else (in_dim_y, in_dim_x)
        self.fc = nn.Linear(film_dim, 2 * self.dim)
        self.fc_out = nn.Linear(self.dim, output_dim)

    def forward(self, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        film, to_be_film = (x, y) if self.x_film else (y, x)
        gamma, beta = torch.split(self.fc(film), self.dim, dim=1)
        return x, y, self.fc_out(gamma * to_be_film + beta)


class GatedFusion(nn.Module):
    """Gated fusion (Kiela et al., arXiv:1802.02892): ``logits = fc_out(sigmoid(fc_x(x)) * fc_y(y))``
    with ``x_gate=True`` (OGM-GE's setting), or ``fc_out(fc_x(x) * sigmoid(fc_y(y)))`` otherwise.

    Like the official module it returns the projected features ``(fc_x(x), fc_y(y), logits)``.
    ``dim`` (the projection width) defaults to ``max(in_dim_x, in_dim_y)``, i.e. 512 in the
    official ResNet-18 setting.
    """

    def __init__(
        self, in_dim_x: int, in_dim_y: int, output_dim: int, dim: int | None = None, x_gate: bool = True
    ) -> None:
        super().__init__()
        dim = max(in_dim_x, in_dim_y) if dim is None else dim
        self.fc_x = nn.Linear(in_dim_x, dim)
        self.fc_y = nn.Linear(in_dim_y, dim)
        self.fc_out = nn.Linear(dim, output_dim)
        self.x_gate = x_gate
        self.sigmoid = nn.Sigmoid()

    def forward(self, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        out_x = self.fc_x(x)
        out_y = self.fc_y(y)
        if self.x_gate:
            fused = self.sigmoid(out_x) * out_y
        else:
            fused = out_x * self.sigmoid(out_y)
        return out_x, out_y, self.fc_out(fused)


def build_fusion(name: str, in_dim_audio: int, in_dim_visual: int, num_classes: int) -> nn.Module:
    """Build a fusion head over (audio (B, in_dim_audio), visual (B, in_dim_visual)) -> (B, num_classes).

    Audio is the first (``x``) input, as in OGM-GE's ``AVClassifier``; FiLM uses ``x_film=True``
    and gated fusion ``x_gate=True`` as OGM-GE_CVPR2022/models/basic_model.py does.

    Args:
        name: one of ``FUSION_NAMES``: "sum", "concat", "film", "gated".
    """
    dims = {"in_dim_audio": in_dim_audio, "in_dim_visual": in_dim_visual, "num_classes": num_classes}
    for field, value in dims.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{field} must be a positive int, got {value!r}")
    if name == "sum":
        return SumFusion(in_dim_audio, in_dim_visual, num_classes)
    if name == "concat":
        return ConcatFusion(in_dim_audio, in_dim_visual, num_classes)
    if name == "film":
        return FiLM(in_dim_audio, in_dim_visual, num_classes, x_film=True)
    if name == "gated":
        return GatedFusion(in_dim_audio, in_dim_visual, num_classes, x_gate=True)
    raise ValueError(f"fusion must be one of {', '.join(repr(n) for n in FUSION_NAMES)}; got {name!r}")
