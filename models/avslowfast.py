"""Audiovisual SlowFast Networks (Xiao, Lee, Grauman, Malik, Feichtenhofer, arXiv:2001.08740).

Three pathways:

* **Slow**: ``T // alpha`` frames, ``width`` channels (the SlowFast Slow pathway).
* **Fast**: all ``T`` frames, ``width // beta_inv`` channels.
* **Audio**: a log-mel spectrogram ``(B, 1, T_a, F)``, ``width // audio_beta_inv`` channels, 2-D convs
  over (time, frequency).

At a *junction* (after the stem and after every residual stage except the last; SlowFast's
pool1/res2/res3/res4) the Fast pathway is fused into the Slow one by a time-strided conv and a
channel concat (``FuseFastToSlow``), and the Audio pathway is fused into that result by a sum
("A->FS" fusion, the paper's default). Which junctions fuse is part of the configuration: the
paper's AVSlowFast R50 fuses only at the last two (official ``FS_FUSION = AFS_FUSION = [False, False,
True, True]``); the CPU-sized ``tiny`` configuration fuses at both of its two. The three pooled pathways are concatenated into one linear
classifier.

DropPathway (paper Sec. 3.3): during training, with probability ``drop_pathway_rate`` the Audio
pathway's contribution to the visual pathways is dropped for the whole iteration; the paper: "When
dropping the audio pathway, we sum zero tensors with the visual pathways." We do exactly that: the
A->FS lateral is still computed and multiplied by ``0.0``, so every parameter stays in the autograd
graph on every step and ``DistributedDataParallel`` never sees an unused parameter (the official
``FuseAV.forward`` does the same: ``fuse = afs_proc_pos * 0.0 + fuse``). As in the official code,
only the audio->visual laterals are dropped: the Audio pathway's own pooled features still reach
the joint classifier.

Sources followed (read, not copied):

* the official AVSlowFast model, ``slowfast/models/video_model_builder.py`` of the PySlowFast code
  base with the AVSlowFast additions (the paper points to facebookresearch/SlowFast, whose current
  HEAD no longer carries them; the files were read from the public-code index) (classes ``FuseAV``,
  ``AVSlowFast``; ``gen_fusion_avs_pattern`` draws ``is_drop = training and random() <
  DROPPATHWAY_RATE`` once per forward, shared by all junctions) and its ``slowfast/config/defaults.py``
  (``SLOWFAST.DROPPATHWAY_RATE = 0.8``, constant: there is no schedule over epochs;
  ``AU_BETA_INV = 2``, ``AU_FUSION_CONV_CHANNEL_RATIO = 0.125``, ``AU_FUSION_KERNEL_SZ = 5``,
  ``AU_FUSION_CONV_NUM = 2``, ``AU_REDUCE_TF_DIM = True``; the model's own configs
  ``configs/Kinetics/AVSLOWFAST_8x8_R50.yaml`` / ``AVSLOWFAST_4x16_R50.yaml`` override
  ``FS_FUSION = AFS_FUSION = [False, False, True, True]``, ``AU_FUSION_CONV_CHANNEL_MODE: ByDim``,
  ``AU_FUSION_CONV_CHANNEL_DIM: 64``, ``AUDIO_FRAME_NUM: 128``, ``AUDIO_MEL_NUM: 80``; those are the
  ``paper`` configuration here (read from fanyix/SlowFast, the code behind facebookresearch/SlowFast
  PR #219);
* facebookresearch/pytorchvideo ``pytorchvideo/models/audio_visual_slowfast.py``
  (``create_audio_visual_slowfast``, ``AudioToSlowFastFusionBuilder``, ``FuseAudioToFastSlow``), the
  API peer. Structural correspondence: our ``visual_encoder.slow_stem``/``fast_stem`` and
  ``audio_encoder.stem`` = its ``blocks[0]`` (``create_res_basic_stem`` x2,
  ``create_acoustic_res_basic_stem``); our ``*_stages[i]`` = its ``blocks[i + 1]`` (audio: the
  first two are ``create_acoustic_bottleneck_block``); our ``fast_to_slow[j]`` +
  ``audio_to_visual[j]`` = its ``FuseAudioToFastSlow`` (``block_fast_to_slow``,
  ``block_audio_to_fastslow``) at ``stage_idx <= max_stage_idx = 3``; our ``head`` = its
  ``create_res_basic_head`` over the three pooled pathways. pytorchvideo is not installed (no wheel
  on the index), so the comparison lives here rather than in a test;
* SlowFast ``configs/Kinetics/SLOWFAST_8x8_R50.yaml`` (``ALPHA: 4``, ``BETA_INV: 8``,
  ``FUSION_CONV_CHANNEL_RATIO: 2``, ``FUSION_KERNEL_SZ: 7``) and ``slowfast/datasets/utils.py``
  (``pack_pathway_output``: Slow frames by ``linspace`` index selection).

Deliberate differences, each small:

* Audio is a 2-D tensor ``(B, C, T_a, F)`` with ``Conv2d``; the official code carries it as a 5-D
  ``(B, C, 1, T_a, F)`` tensor with ``Conv3d`` kernels of temporal size 1: the same arithmetic.
* The temporal stride of the last A->FS conv is the audio/slow frame-rate ratio at that junction
  (official ``AU_ALPHA // tf_dim_reduction``). We read it off the tensors instead of a config
  constant, so any clip length works; when ``T_a`` is not an exact multiple of the Slow frame count
  the conv output is resampled to the Slow length by adaptive average pooling (for
  ``T_a = AU_ALPHA * T_slow``, as in the paper, nothing changes).
* The head pools globally (``mean``) instead of ``AvgPool3d`` with a kernel computed from the crop
  size: identical when the input has the configured size, and it accepts any size.
* ``logits_audio`` / ``logits_visual`` come from two extra linear *probe* heads on ``.detach()``-ed
  pooled features (not in the paper): they measure each pathway without training it.
* The audio-visual synchronisation (AVS) auxiliary loss of the paper is not implemented.
* DropPathway draws from torch's RNG (or a passed generator) rather than Python's ``random``.
* In ``ByRatio`` mode (the ``tiny`` config) the A->FS intermediate width is ``max(1, int(C_a * 0.125))``
  so that the tiny config keeps a channel; the paper config uses ``ByDim`` 64 as the official one.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from models.outputs import AVOutput

__all__ = [
    "AVSLOWFAST_CONFIGS",
    "AVSlowFast",
    "AVSlowFastConfig",
    "DropPathway",
    "build_avslowfast",
    "drop_pathway",
]

# Official default, slowfast/config/defaults.py: _C.SLOWFAST.DROPPATHWAY_RATE = 0.8 (a constant rate;
# neither the code nor the configs schedule it over epochs).
PAPER_DROP_PATHWAY_RATE = 0.8


# ---- DropPathway -------------------------------------------------------------------------------


def drop_pathway(x: Tensor, rate: float, training: bool, generator: torch.Generator | None = None) -> Tensor:
    """Drop a whole pathway's contribution with probability ``rate`` (one draw for the whole batch).

    Returns ``x * 0.0`` (graph kept connected, so DDP sees every parameter used) or ``x`` unchanged.
    Identity when ``training`` is False. There is no rescaling by ``1 / (1 - rate)``: the official
    code simply sums zeros into the visual pathway.
    """
    if not training or rate <= 0.0:
        return x
    keep = float(torch.rand((), generator=generator).item() >= rate)
    return x * keep


class DropPathway(nn.Module):
    """DropPathway (AVSlowFast Sec. 3.3) with a constant drop ``rate`` (official default 0.8).

    One Bernoulli draw per training iteration decides whether the Audio pathway is dropped at *all*
    fusion junctions of that iteration (official ``gen_fusion_avs_pattern``). Call
    :meth:`sample_keep` once per forward and scale every audio lateral contribution by the result.

    Args:
        rate: probability of dropping the pathway in a training iteration, in ``[0, 1]``.
        generator: optional CPU generator for the draws (default: the global torch RNG).
    """

    def __init__(self, rate: float = PAPER_DROP_PATHWAY_RATE, generator: torch.Generator | None = None) -> None:
        super().__init__()
        if not 0.0 <= float(rate) <= 1.0:
            raise ValueError(f"drop_pathway_rate must be in [0, 1], got {rate!r}")
        self.rate = float(rate)
        self.generator = generator

    def sample_keep(self) -> float:
        """1.0 (keep) or 0.0 (drop) for this iteration; always 1.0 in eval mode."""
        if not self.training or self.rate <= 0.0:
            return 1.0
        # Drawn on the CPU so it never forces a device synchronisation.
        return float(torch.rand((), generator=self.generator).item() >= self.rate)

    def forward(self, x: Tensor, keep: float | None = None) -> Tensor:
        """``x`` scaled by ``keep`` (sampled here when not given). Identity in eval mode."""
        if not self.training:
            return x
        keep = self.sample_keep() if keep is None else keep
        return x * keep

    def extra_repr(self) -> str:
        return f"rate={self.rate}"


# ---- configuration -----------------------------------------------------------------------------


@dataclass(frozen=True)
class AVSlowFastConfig:
    """Architecture of one AVSlowFast network.

    Attributes:
        stage_depths: bottleneck blocks per residual stage (res2, res3, ...); R50 is (3, 4, 6, 3).
        width: Slow stem channels (``RESNET.WIDTH_PER_GROUP``); stage ``i`` outputs ``width * 4 * 2**i``.
        alpha: Fast/Slow frame-rate ratio (``SLOWFAST.ALPHA``).
        beta_inv: Slow/Fast channel ratio (``SLOWFAST.BETA_INV``).
        fusion_conv_channel_ratio: Fast->Slow lateral output channels / Fast channels.
        fusion_kernel: temporal kernel of the Fast->Slow lateral conv.
        audio_beta_inv: Slow/Audio channel ratio (``SLOWFAST.AU_BETA_INV``).
        audio_fusion_channel_ratio: A->FS intermediate channels / Audio channels (``ByRatio`` mode).
        audio_fusion_kernel: temporal kernel of the A->FS convs.
        audio_fusion_conv_num: number of convs in the A->FS lateral.
        audio_separable_stages: leading audio stages whose 3x3 conv is split into parallel (3x1) and
            (1x3) time / frequency convs (pytorchvideo ``create_acoustic_bottleneck_block``).
        slow_temporal_kernels: temporal kernel of the Slow stem and of each stage's first conv.
        fast_temporal_kernels: the same for the Fast pathway.
        fast_fusion: per junction (before each stage: after the stem, then after each stage but the
            last; SlowFast's pool1 / res2 / res3 / res4), whether the Fast->Slow lateral is used
            (official ``FS_FUSION``).
        audio_fusion: per junction, whether the Audio->(Fast, Slow) lateral is used (``AFS_FUSION``).
        audio_fusion_channel_dim: intermediate width of the A->FS convs (official
            ``AU_FUSION_CONV_CHANNEL_MODE: ByDim`` with ``AU_FUSION_CONV_CHANNEL_DIM``); ``None``: the
            ``ByRatio`` mode, ``audio channels * audio_fusion_channel_ratio``.
        num_frames: default Fast-pathway clip length (documentation and ``example_inputs``).
        audio_frames: default log-mel time frames.
        audio_mel_bins: default log-mel frequency bins.
        crop_size: default spatial size.
        dropout_rate: dropout before the joint classifier (``MODEL.DROPOUT_RATE``).
    """

    stage_depths: tuple[int, ...]
    width: int
    alpha: int
    beta_inv: int
    fusion_conv_channel_ratio: int
    fusion_kernel: int
    audio_beta_inv: int
    audio_fusion_channel_ratio: float
    audio_fusion_kernel: int
    audio_fusion_conv_num: int
    audio_separable_stages: int
    slow_temporal_kernels: tuple[int, ...]
    fast_temporal_kernels: tuple[int, ...]
    fast_fusion: tuple[bool, ...]
    audio_fusion: tuple[bool, ...]
    audio_fusion_channel_dim: int | None
    num_frames: int
    audio_frames: int
    audio_mel_bins: int
    crop_size: int
    dropout_rate: float = 0.5

    @property
    def num_junctions(self) -> int:
        return len(self.stage_depths)

    def validate(self) -> None:
        """Raise ``ValueError`` naming the first inconsistent field."""
        n = len(self.stage_depths)
        if n < 1 or any(d < 1 for d in self.stage_depths):
            raise ValueError(f"stage_depths must be a non-empty tuple of positive ints, got {self.stage_depths!r}")
        for name in ("width", "alpha", "beta_inv", "fusion_conv_channel_ratio", "fusion_kernel", "audio_beta_inv",
                     "audio_fusion_kernel", "audio_fusion_conv_num", "num_frames", "audio_frames",
                     "audio_mel_bins", "crop_size"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)!r}")
        if self.width // self.beta_inv < 1:
            raise ValueError(f"width ({self.width}) // beta_inv ({self.beta_inv}) leaves the Fast pathway no channels")
        if self.width // self.audio_beta_inv < 1:
            raise ValueError(
                f"width ({self.width}) // audio_beta_inv ({self.audio_beta_inv}) leaves the Audio pathway no channels"
            )
        for name in ("slow_temporal_kernels", "fast_temporal_kernels"):
            kernels = getattr(self, name)
            if len(kernels) != n + 1 or any(k < 1 or k % 2 == 0 for k in kernels):
                raise ValueError(f"{name} needs {n + 1} odd kernels (stem + {n} stages), got {kernels!r}")
        if self.fusion_kernel % 2 == 0 or self.audio_fusion_kernel % 2 == 0:
            raise ValueError("fusion_kernel and audio_fusion_kernel must be odd (centred 'same' padding)")
        for name in ("fast_fusion", "audio_fusion"):
            if len(getattr(self, name)) != n:
                raise ValueError(f"{name} needs {n} flags (one per junction), got {getattr(self, name)!r}")
        if self.audio_fusion_channel_dim is not None and self.audio_fusion_channel_dim < 1:
            raise ValueError(f"audio_fusion_channel_dim must be >= 1 or None, got {self.audio_fusion_channel_dim!r}")
        if not 0.0 < self.audio_fusion_channel_ratio <= 1.0:
            raise ValueError(f"audio_fusion_channel_ratio must be in (0, 1], got {self.audio_fusion_channel_ratio!r}")
        if not 0.0 <= self.dropout_rate < 1.0:
            raise ValueError(f"dropout_rate must be in [0, 1), got {self.dropout_rate!r}")
        if self.num_frames % self.alpha:
            raise ValueError(f"num_frames ({self.num_frames}) must be a multiple of alpha ({self.alpha})")


AVSLOWFAST_CONFIGS: dict[str, AVSlowFastConfig] = {
    # A miniature with the same topology: 2 stages of one bottleneck each, 8/2/4 stem channels
    # (slow/fast/audio), 8 frames at 64x64, 64x40 log-mel. Trains on a CPU in seconds per epoch.
    "tiny": AVSlowFastConfig(
        stage_depths=(1, 1),
        width=8,
        alpha=4,
        beta_inv=4,
        fusion_conv_channel_ratio=2,
        fusion_kernel=5,
        audio_beta_inv=2,
        audio_fusion_channel_ratio=0.125,
        audio_fusion_kernel=5,
        audio_fusion_conv_num=2,
        audio_separable_stages=2,
        slow_temporal_kernels=(1, 1, 1),
        fast_temporal_kernels=(5, 3, 3),
        # Both junctions of the 2-stage miniature fuse: with the paper's late-only pattern mapped onto
        # 2 stages, the Slow pathway would see the Fast and Audio laterals at one junction only.
        fast_fusion=(True, True),
        audio_fusion=(True, True),
        audio_fusion_channel_dim=None,
        num_frames=8,
        audio_frames=64,
        audio_mel_bins=40,
        crop_size=64,
        dropout_rate=0.5,
    ),
    # AVSlowFast R50 8x8, configs/Kinetics/AVSLOWFAST_8x8_R50.yaml (and _4x16_, which sets the same
    # fusion): ResNet-50 depths, alpha 4, beta_inv 8, fusion kernel 7, audio beta_inv 2;
    # FS_FUSION = AFS_FUSION = [False, False, True, True]: Fast->Slow and Audio->(Fast, Slow) laterals
    # only before res4 and res5 (after res3 and res4); AU_FUSION_CONV_CHANNEL_MODE ByDim with
    # AU_FUSION_CONV_CHANNEL_DIM 64; AUDIO_FRAME_NUM 128, AUDIO_MEL_NUM 80; temporal kernels of
    # _TEMPORAL_KERNEL_BASIS["avslowfast"].
    "paper": AVSlowFastConfig(
        stage_depths=(3, 4, 6, 3),
        width=64,
        alpha=4,
        beta_inv=8,
        fusion_conv_channel_ratio=2,
        fusion_kernel=7,
        audio_beta_inv=2,
        audio_fusion_channel_ratio=0.25,
        audio_fusion_kernel=5,
        audio_fusion_conv_num=2,
        audio_separable_stages=2,
        slow_temporal_kernels=(1, 1, 1, 3, 3),
        fast_temporal_kernels=(5, 3, 3, 3, 3),
        fast_fusion=(False, False, True, True),
        audio_fusion=(False, False, True, True),
        audio_fusion_channel_dim=64,
        num_frames=32,
        audio_frames=128,
        audio_mel_bins=80,
        crop_size=224,
        dropout_rate=0.5,
    ),
}


# ---- building blocks ---------------------------------------------------------------------------


def _bn(dim: int, kind: int, zero_init: bool = False) -> nn.Module:
    norm = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}[kind](dim)
    # Zero-initialised final BN of a residual branch (RESNET.ZERO_INIT_FINAL_BN: True): every block
    # starts as the identity, read by _init_weights.
    norm.zero_init = zero_init  # type: ignore[attr-defined]
    return norm


class _VisualStem(nn.Module):
    """(kt x 7 x 7) conv, stride (1, 2, 2), BN, ReLU, (1 x 3 x 3) max-pool stride (1, 2, 2).

    Shapes: (B, C_in, T, H, W) -> (B, dim_out, T, H / 4, W / 4).
    """

    def __init__(self, dim_in: int, dim_out: int, temporal_kernel: int) -> None:
        super().__init__()
        self.conv = nn.Conv3d(dim_in, dim_out, (temporal_kernel, 7, 7), stride=(1, 2, 2),
                              padding=(temporal_kernel // 2, 3, 3), bias=False)
        self.bn = _bn(dim_out, 3)
        self.pool = nn.MaxPool3d((1, 3, 3), stride=(1, 2, 2), padding=(0, 1, 1))

    def forward(self, x: Tensor) -> Tensor:
        return self.pool(F.relu(self.bn(self.conv(x)), inplace=True))


class _AudioStem(nn.Module):
    """Parallel (9 x 1) time and (1 x 9) frequency convs, summed, then BN, ReLU; no pooling.

    Official stem kernels ``[9, 1]`` / ``[1, 9]``; pytorchvideo ``create_acoustic_res_basic_stem``
    (``ConvReduce3D`` with sum). Shapes: (B, 1, T_a, F) -> (B, dim_out, T_a, F).
    """

    def __init__(self, dim_in: int, dim_out: int) -> None:
        super().__init__()
        self.conv_time = nn.Conv2d(dim_in, dim_out, (9, 1), padding=(4, 0), bias=False)
        self.conv_freq = nn.Conv2d(dim_in, dim_out, (1, 9), padding=(0, 4), bias=False)
        self.bn = _bn(dim_out, 2)

    def forward(self, x: Tensor) -> Tensor:
        return F.relu(self.bn(self.conv_time(x) + self.conv_freq(x)), inplace=True)


class _Bottleneck3d(nn.Module):
    """SlowFast bottleneck: (kt x 1 x 1) conv, (1 x 3 x 3) conv with the spatial stride, (1 x 1 x 1) conv.

    Shapes: (B, dim_in, T, H, W) -> (B, dim_out, T, H / stride, W / stride).
    """

    def __init__(self, dim_in: int, dim_out: int, dim_inner: int, temporal_kernel: int, stride: int) -> None:
        super().__init__()
        self.conv_a = nn.Conv3d(dim_in, dim_inner, (temporal_kernel, 1, 1), padding=(temporal_kernel // 2, 0, 0),
                                bias=False)
        self.bn_a = _bn(dim_inner, 3)
        self.conv_b = nn.Conv3d(dim_inner, dim_inner, (1, 3, 3), stride=(1, stride, stride), padding=(0, 1, 1),
                                bias=False)
        self.bn_b = _bn(dim_inner, 3)
        self.conv_c = nn.Conv3d(dim_inner, dim_out, 1, bias=False)
        self.bn_c = _bn(dim_out, 3, zero_init=True)
        self.shortcut: nn.Module | None = None
        if dim_in != dim_out or stride != 1:
            self.shortcut = nn.Sequential(
                nn.Conv3d(dim_in, dim_out, 1, stride=(1, stride, stride), bias=False), _bn(dim_out, 3)
            )

    def forward(self, x: Tensor) -> Tensor:
        y = F.relu(self.bn_a(self.conv_a(x)), inplace=True)
        y = F.relu(self.bn_b(self.conv_b(y)), inplace=True)
        y = self.bn_c(self.conv_c(y))
        return F.relu(y + (x if self.shortcut is None else self.shortcut(x)), inplace=True)


class _AudioBottleneck(nn.Module):
    """Audio bottleneck on (time, frequency): 1x1 conv, 3x3 conv (or separable 3x1 + 1x3), 1x1 conv.

    ``separable`` follows pytorchvideo ``create_acoustic_bottleneck_block``: a (3 x 1) time conv and a
    (1 x 3) frequency conv in parallel, each with BN and ReLU, summed. The stride applies to both time
    and frequency (official ``AU_REDUCE_TF_DIM``). Shapes: (B, dim_in, T, F) -> (B, dim_out, T / s, F / s).
    """

    def __init__(self, dim_in: int, dim_out: int, dim_inner: int, stride: int, separable: bool) -> None:
        super().__init__()
        self.separable = separable
        self.conv_a = nn.Conv2d(dim_in, dim_inner, 1, bias=False)
        self.bn_a = _bn(dim_inner, 2)
        if separable:
            self.conv_b_time = nn.Conv2d(dim_inner, dim_inner, (3, 1), stride=stride, padding=(1, 0), bias=False)
            self.bn_b_time = _bn(dim_inner, 2)
            self.conv_b_freq = nn.Conv2d(dim_inner, dim_inner, (1, 3), stride=stride, padding=(0, 1), bias=False)
            self.bn_b_freq = _bn(dim_inner, 2)
        else:
            self.conv_b = nn.Conv2d(dim_inner, dim_inner, 3, stride=stride, padding=1, bias=False)
            self.bn_b = _bn(dim_inner, 2)
        self.conv_c = nn.Conv2d(dim_inner, dim_out, 1, bias=False)
        self.bn_c = _bn(dim_out, 2, zero_init=True)
        self.shortcut: nn.Module | None = None
        if dim_in != dim_out or stride != 1:
            self.shortcut = nn.Sequential(nn.Conv2d(dim_in, dim_out, 1, stride=stride, bias=False), _bn(dim_out, 2))

    def forward(self, x: Tensor) -> Tensor:
        y = F.relu(self.bn_a(self.conv_a(x)), inplace=True)
        if self.separable:
            y = F.relu(self.bn_b_time(self.conv_b_time(y))) + F.relu(self.bn_b_freq(self.conv_b_freq(y)))
        else:
            y = F.relu(self.bn_b(self.conv_b(y)), inplace=True)
        y = self.bn_c(self.conv_c(y))
        return F.relu(y + (x if self.shortcut is None else self.shortcut(x)), inplace=True)


class _FastToSlow(nn.Module):
    """SlowFast lateral: (k x 1 x 1) conv with temporal stride alpha, BN, ReLU.

    Shapes: (B, C_f, T, H, W) -> (B, C_f * ratio, T / alpha, H, W); concatenated onto the Slow pathway.
    """

    def __init__(self, dim_fast: int, channel_ratio: int, kernel: int, alpha: int) -> None:
        super().__init__()
        self.conv = nn.Conv3d(dim_fast, dim_fast * channel_ratio, (kernel, 1, 1), stride=(alpha, 1, 1),
                              padding=(kernel // 2, 0, 0), bias=False)
        self.bn = _bn(dim_fast * channel_ratio, 3)

    def forward(self, x: Tensor) -> Tensor:
        return F.relu(self.bn(self.conv(x)), inplace=True)


class _AudioToVisual(nn.Module):
    """A->FS lateral (official ``FuseAV``, ``conv_a2fs_*``): frequency mean, then ``num_convs`` temporal convs.

    The last conv maps to the fused Slow width and is strided by the audio/Slow frame-rate ratio.
    Shapes: audio (B, C_a, T_a, F) -> (B, dim_out, T_slow, 1, 1), broadcast-added over (H, W).
    """

    def __init__(self, dim_audio: int, dim_out: int, channel_ratio: float, kernel: int, num_convs: int,
                 channel_dim: int | None = None) -> None:
        super().__init__()
        # Official FuseAV: ByDim -> AU_FUSION_CONV_CHANNEL_DIM; ByRatio -> int(dim_in_a * ratio), here at
        # least one channel so tiny configurations stay valid.
        interm = channel_dim if channel_dim is not None else max(1, int(dim_audio * channel_ratio))
        self.kernel = kernel
        convs, norms = [], []
        cur = dim_audio
        for idx in range(num_convs):
            out = dim_out if idx == num_convs - 1 else interm
            convs.append(nn.Conv1d(cur, out, kernel, padding=kernel // 2, bias=False))
            norms.append(_bn(out, 1))
            cur = out
        self.convs = nn.ModuleList(convs)
        self.norms = nn.ModuleList(norms)

    def forward(self, audio: Tensor, slow_frames: int) -> Tensor:
        x = audio.mean(dim=-1)  # (B, C_a, T_a): reduce frequency ("[N C 1 T F] -> [N C 1 T 1]")
        last = len(self.convs) - 1
        for idx, (conv, norm) in enumerate(zip(self.convs, self.norms)):
            stride = 1
            if idx == last:
                # Official stride: AU_ALPHA // tf_dim_reduction, i.e. audio frames per Slow frame here.
                stride = max(1, x.shape[-1] // slow_frames)
            x = F.relu(norm(F.conv1d(x, conv.weight, None, stride=stride, padding=self.kernel // 2)), inplace=True)
        if x.shape[-1] != slow_frames:
            x = F.adaptive_avg_pool1d(x, slow_frames)
        return x[..., None, None]  # (B, C, T_slow, 1, 1)


def _init_weights(model: nn.Module, fc_init_std: float = 0.01) -> None:
    """SlowFast ``init_weights``: MSRA fill for convs, BN (1, 0) or zero-init final BN, FC N(0, 0.01)."""
    for m in model.modules():
        if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)):
            nn.init.constant_(m.weight, 0.0 if getattr(m, "zero_init", False) else 1.0)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, std=fc_init_std)
            nn.init.zeros_(m.bias)


# ---- the network -------------------------------------------------------------------------------


class AVSlowFast(nn.Module):
    """Audiovisual SlowFast network.

    Args:
        config: the architecture.
        num_classes: K.
        drop_pathway_rate: DropPathway probability (paper / official default 0.8).
        dropout_rate: dropout before the joint classifier; ``None`` takes ``config.dropout_rate``.
        generator: optional CPU generator for the DropPathway draws.

    Inputs: ``audio`` (B, 1, T_a, F) log-mel; ``visual`` (B, 3, T, H, W) with ``T % alpha == 0``.
    Output: :class:`~models.outputs.AVOutput` with ``logits`` (B, K) from the joint head and
    ``logits_audio`` / ``logits_visual`` (B, K) from linear probes on detached pooled features.

    Attributes:
        audio_encoder: ``ModuleDict(stem, stages)``: the Audio pathway.
        visual_encoder: ``ModuleDict(slow_stem, fast_stem, slow_stages, fast_stages, fast_to_slow)``.
        audio_to_visual: the A->FS laterals (one per junction with audio fusion, else ``Identity``).
        has_probe_heads: True: the training loop adds the probe heads' cross-entropy losses.
    """

    has_probe_heads = True

    def __init__(
        self,
        config: AVSlowFastConfig,
        num_classes: int,
        drop_pathway_rate: float = PAPER_DROP_PATHWAY_RATE,
        dropout_rate: float | None = None,
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__()
        config.validate()
        if int(num_classes) < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes!r}")
        if dropout_rate is not None:
            config = replace(config, dropout_rate=float(dropout_rate))
            config.validate()
        self.config = config
        self.num_classes = int(num_classes)
        c = config
        n = len(c.stage_depths)

        slow_dim, fast_dim, audio_dim = c.width, c.width // c.beta_inv, c.width // c.audio_beta_inv
        slow_stem = _VisualStem(3, slow_dim, c.slow_temporal_kernels[0])
        fast_stem = _VisualStem(3, fast_dim, c.fast_temporal_kernels[0])
        audio_stem = _AudioStem(1, audio_dim)

        slow_stages, fast_stages, audio_stages = nn.ModuleList(), nn.ModuleList(), nn.ModuleList()
        fast_to_slow, audio_to_visual = nn.ModuleList(), nn.ModuleList()
        for i, depth in enumerate(c.stage_depths):
            # Junction i sits before stage i (after the stem, or after stage i - 1).
            # A junction without a lateral leaves that pathway's Slow input as it is (official
            # `width_per_group // out_dim_ratio if FS_FUSION[i] else 0` extra channels).
            lateral_dim = fast_dim * c.fusion_conv_channel_ratio if c.fast_fusion[i] else 0
            fast_to_slow.append(_FastToSlow(fast_dim, c.fusion_conv_channel_ratio, c.fusion_kernel, c.alpha)
                                if c.fast_fusion[i] else nn.Identity())
            fused_slow = slow_dim + lateral_dim
            audio_to_visual.append(
                _AudioToVisual(audio_dim, fused_slow, c.audio_fusion_channel_ratio, c.audio_fusion_kernel,
                               c.audio_fusion_conv_num, c.audio_fusion_channel_dim)
                if c.audio_fusion[i] else nn.Identity()
            )
            stride = 1 if i == 0 else 2
            out_s, inner_s = c.width * 4 * 2**i, c.width * 2**i
            out_f, inner_f = out_s // c.beta_inv, max(1, inner_s // c.beta_inv)
            out_a, inner_a = out_s // c.audio_beta_inv, max(1, inner_s // c.audio_beta_inv)
            slow_stages.append(nn.Sequential(*[
                _Bottleneck3d(fused_slow if b == 0 else out_s, out_s, inner_s, c.slow_temporal_kernels[i + 1],
                              stride if b == 0 else 1)
                for b in range(depth)
            ]))
            fast_stages.append(nn.Sequential(*[
                _Bottleneck3d(fast_dim if b == 0 else out_f, out_f, inner_f, c.fast_temporal_kernels[i + 1],
                              stride if b == 0 else 1)
                for b in range(depth)
            ]))
            audio_stages.append(nn.Sequential(*[
                _AudioBottleneck(audio_dim if b == 0 else out_a, out_a, inner_a, stride if b == 0 else 1,
                                 separable=i < c.audio_separable_stages)
                for b in range(depth)
            ]))
            slow_dim, fast_dim, audio_dim = out_s, out_f, out_a

        self.visual_encoder = nn.ModuleDict(dict(
            slow_stem=slow_stem, fast_stem=fast_stem, slow_stages=slow_stages, fast_stages=fast_stages,
            fast_to_slow=fast_to_slow,
        ))
        self.audio_encoder = nn.ModuleDict(dict(stem=audio_stem, stages=audio_stages))
        self.audio_to_visual = audio_to_visual
        self.drop_pathway = DropPathway(drop_pathway_rate, generator=generator)

        self.slow_dim, self.fast_dim, self.audio_dim = slow_dim, fast_dim, audio_dim
        self.dropout = nn.Dropout(c.dropout_rate)
        self.head = nn.Linear(slow_dim + fast_dim + audio_dim, self.num_classes)
        self.probe_audio = nn.Linear(audio_dim, self.num_classes)
        self.probe_visual = nn.Linear(slow_dim + fast_dim, self.num_classes)
        _init_weights(self)
        assert n == len(self.audio_to_visual)

    @property
    def drop_pathway_rate(self) -> float:
        return self.drop_pathway.rate

    def _check_inputs(self, audio: Tensor, visual: Tensor) -> None:
        if visual.dim() != 5 or visual.shape[1] != 3:
            raise ValueError(f"visual: expected (B, 3, T, H, W) frames, got shape {tuple(visual.shape)}")
        if audio.dim() != 4 or audio.shape[1] != 1:
            raise ValueError(f"audio: expected a (B, 1, T_a, F) log-mel spectrogram, got shape {tuple(audio.shape)}")
        if audio.shape[0] != visual.shape[0]:
            raise ValueError(f"audio and visual batch sizes differ: {audio.shape[0]} vs {visual.shape[0]}")
        t = visual.shape[2]
        if t < self.config.alpha or t % self.config.alpha:
            raise ValueError(
                f"visual: the clip has {t} frames; AVSlowFast needs a positive multiple of alpha={self.config.alpha}"
            )

    def forward_features(self, audio: Tensor, visual: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Pooled pathway features ``(slow (B, C_s), fast (B, C_f), audio (B, C_a))``."""
        self._check_inputs(audio, visual)
        alpha = self.config.alpha
        t = visual.shape[2]
        # pack_pathway_output: Slow frames are T // alpha frames picked by linspace over the clip.
        idx = torch.linspace(0, t - 1, t // alpha, device=visual.device).long()
        slow = self.visual_encoder["slow_stem"](visual.index_select(2, idx))
        fast = self.visual_encoder["fast_stem"](visual)
        aud = self.audio_encoder["stem"](audio)
        keep = self.drop_pathway.sample_keep()  # one draw per iteration, shared by all junctions
        for i in range(len(self.config.stage_depths)):
            if self.config.fast_fusion[i]:
                slow = torch.cat([slow, self.visual_encoder["fast_to_slow"][i](fast)], dim=1)
            if self.config.audio_fusion[i]:
                a2v = self.audio_to_visual[i](aud, slow.shape[2])
                # DropPathway: "sum zero tensors with the visual pathways"; the multiply keeps the
                # lateral in the graph so DDP sees its parameters used on every step.
                slow = slow + (a2v * keep if self.training else a2v)
            slow = self.visual_encoder["slow_stages"][i](slow)
            fast = self.visual_encoder["fast_stages"][i](fast)
            aud = self.audio_encoder["stages"][i](aud)
        return slow.mean(dim=(2, 3, 4)), fast.mean(dim=(2, 3, 4)), aud.mean(dim=(2, 3))

    def forward(self, audio: Tensor, visual: Tensor) -> AVOutput:
        slow, fast, aud = self.forward_features(audio, visual)
        joint = self.head(self.dropout(torch.cat([slow, fast, aud], dim=1)))
        # Probes read detached features: their loss trains only the probe weights.
        logits_audio = self.probe_audio(aud.detach())
        logits_visual = self.probe_visual(torch.cat([slow, fast], dim=1).detach())
        return AVOutput(logits=joint, logits_audio=logits_audio, logits_visual=logits_visual)

    def to_channels_last(self) -> AVSlowFast:
        """Channels-last weights: ``Conv3d`` -> ``channels_last_3d``, ``Conv2d`` -> ``channels_last``.

        ``Module.to(memory_format=torch.channels_last_3d)`` raises on this model because the audio
        pathway has 4-D (``Conv2d``) weights; this converts each kind to its own format.
        """
        for module in self.modules():
            if isinstance(module, nn.Conv3d):
                module.to(memory_format=torch.channels_last_3d)
            elif isinstance(module, nn.Conv2d):
                module.to(memory_format=torch.channels_last)
        return self

    def example_inputs(self, batch_size: int = 2, num_frames: int | None = None, crop_size: int | None = None,
                       audio_frames: int | None = None) -> tuple[Tensor, Tensor]:
        """Random ``(audio, visual)`` of the configured (or given) sizes, for smoke tests."""
        c = self.config
        audio = torch.randn(batch_size, 1, audio_frames or c.audio_frames, c.audio_mel_bins)
        s = crop_size or c.crop_size
        visual = torch.randn(batch_size, 3, num_frames or c.num_frames, s, s)
        return audio, visual


def build_avslowfast(
    num_classes: int,
    config: str = "tiny",
    drop_pathway_rate: float = PAPER_DROP_PATHWAY_RATE,
    dropout_rate: float | None = None,
    generator: torch.Generator | None = None,
    fusion_junctions: tuple[bool, ...] | None = None,
) -> AVSlowFast:
    """Build an :class:`AVSlowFast` network.

    Args:
        num_classes: K.
        config: ``"tiny"`` (CPU-sized, 2 stages, width 8) or ``"paper"`` (AVSlowFast R50 8x8).
        drop_pathway_rate: DropPathway probability; 0.8 is the official default (constant over training).
        dropout_rate: dropout before the joint classifier; ``None`` keeps the config's 0.5.
        generator: optional CPU generator for DropPathway draws.
        fusion_junctions: per junction (one per stage), whether both the Fast->Slow and the
            Audio->(Fast, Slow) laterals are used; ``None`` keeps the config's (paper: official
            ``[False, False, True, True]``).
    """
    if config not in AVSLOWFAST_CONFIGS:
        raise ValueError(f"config: unknown AVSlowFast config {config!r}; choose one of {sorted(AVSLOWFAST_CONFIGS)}")
    rate = drop_pathway_rate
    if isinstance(rate, bool) or not isinstance(rate, (int, float)) or math.isnan(rate):
        raise ValueError(f"drop_pathway_rate must be a number in [0, 1], got {drop_pathway_rate!r}")
    chosen = AVSLOWFAST_CONFIGS[config]
    if fusion_junctions is not None:
        flags = tuple(bool(f) for f in fusion_junctions)
        if len(flags) != len(chosen.stage_depths):
            raise ValueError(f"fusion_junctions: the {config} config has {len(chosen.stage_depths)} junctions, "
                             f"got {len(flags)} flags")
        chosen = replace(chosen, fast_fusion=flags, audio_fusion=flags)
    return AVSlowFast(chosen, num_classes, drop_pathway_rate=float(drop_pathway_rate),
                      dropout_rate=dropout_rate, generator=generator)
